"""The console's local interface (agent/consolesock.py) against real agents.

Most tests run `gate-agent run` in its own process on mock pins (tests/agentproc.py)
and talk to its ``console.sock`` as the web console does; cards, PASS and the fire
loop go in through its ``sim.sock`` (agent.simctl), as on real hardware. What the
gate journalled is read back from its journal. The slow watcher runs the service
in this process, so the test can hand its gate thread thousands of records.
"""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest

from agent import contract
from agent.consolesock import (
    ConsoleServer,
    peer_allowed,
    peer_uid,
    request,
    socket_path,
    watch,
)
from agent.core.events import Report
from tests.agentproc import CARDS, AgentProcess, RawClient
from tests.broker import broker, ingest_at, make_broker  # noqa: F401  (fixtures)
from tests.twins import one_twin  # noqa: F401  (the socket does not differ between the twins)

TECH = "tech.ivanova"
WAIT_S = 20.0  # generous: the machine may be slow; nothing here measures speed

STATUS_KEYS = {"site", "gate", "version", "fastpath", "uptime_s", "mode", "commanded_mode", "fire", "outputs",
               "inputs", "readers", "journal", "acl", "clock", "uplink", "alarms", "key_width", "directions"}


@pytest.fixture
def agent(tmp_path):
    a = AgentProcess(tmp_path / "board").start(timeout=60)
    deadline = time.monotonic() + WAIT_S
    while not a.state.joinpath("console.sock").exists():  # opened right after READY
        assert time.monotonic() < deadline, a.log_tail()
        time.sleep(0.05)
    yield a
    a.stop()


def console(agent: AgentProcess, doc: dict) -> dict:
    return request(socket_path(agent.state), doc, timeout=WAIT_S)


def wait_for(what, timeout: float = WAIT_S, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "not within the wait"
        time.sleep(every)


def records_of(agent: AgentProcess, rtype: str, **match) -> list[dict]:
    return [r for r in agent.records() if r["type"] == rtype and all(r.get(k) == v for k, v in match.items())]


# --- status and watch ----------------------------------------------------------------------------


def test_the_socket_is_private_and_the_status_has_every_field(agent):
    path = socket_path(agent.state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert console(agent, {"op": "ping"}) == {"ok": True, "op": "ping"}
    reply = console(agent, {"op": "status"})
    assert reply["ok"] and reply["op"] == "status"
    st = reply["status"]
    assert set(st) == STATUS_KEYS
    assert (st["site"], st["gate"], st["mode"], st["commanded_mode"]) == (agent.site, agent.gate, "normal", "normal")
    assert st["fire"] == {"latched": False, "loop_open": False}
    assert {"unlock_a", "unlock_b", "stop", "entry.led", "exit.beeper"} <= set(st["outputs"])
    assert not any(st["outputs"].values())
    assert st["inputs"]["pass_a"]["active"] is False and "passage sensor A" in st["inputs"]["pass_a"]["meaning"]
    assert st["inputs"]["fire_loop"]["active"] is False
    readers = {r["name"]: r for r in st["readers"]}
    assert (readers["entry"]["type"], readers["entry"]["direction"], readers["exit"]["direction"]) == (
        "wiegand", "in", "out")
    assert readers["entry"]["last_read"] is None and readers["entry"]["errors"] == 0
    assert (st["acl"]["version"], st["acl"]["cards"], st["acl"]["stale"]) == ("rig.1", len(CARDS) + 1, False)
    assert st["acl"]["age_s"] >= 0
    assert st["journal"]["last_seq"] >= 1 and st["journal"]["backlog"] >= 1  # agent.started, no broker
    assert st["clock"]["now"].endswith("Z") and isinstance(st["clock"]["synced"], bool)
    assert st["uplink"] == {"enabled": False, "connected": None}
    assert (st["key_width"], st["directions"]) == (24, {"entry": "in", "exit": "out"})
    agent.card(CARDS[0])
    after = console(agent, {"op": "status"})["status"]
    assert {r["name"]: r for r in after["readers"]}["entry"]["last_read"] is not None
    assert after["journal"]["last_seq"] > st["journal"]["last_seq"]


def test_a_watcher_sees_a_card_read_as_the_journalled_record_and_a_status_each_second(agent):
    stream = watch(socket_path(agent.state), timeout=WAIT_S)
    first = next(stream)
    while "status" not in first:  # one comes at once (a record committed meanwhile may come first)
        first = next(stream)
    assert set(first) == {"status"} and set(first["status"]) == STATUS_KEYS
    decision = agent.card(CARDS[3])["decision"]
    assert decision is not None and decision["type"] == "access.granted"
    seen: list[dict] = []
    deadline = time.monotonic() + WAIT_S
    for line in stream:
        assert time.monotonic() < deadline, f"the card's record never came; seen {seen}"
        if "record" in line:
            seen.append(line["record"])
            if line["record"]["id"] == decision["id"]:
                break
    (granted,) = [r for r in seen if r["id"] == decision["id"]]
    journalled = {r["id"]: r for r in agent.records()}[decision["id"]]
    assert granted == journalled  # the contract record, exactly as journalled
    assert granted["person"] == "p-3" and granted["reader"] == "entry"
    for line in stream:  # the statuses go on, and show the read
        assert time.monotonic() < deadline, "no status after the record"
        if "status" in line:
            entry = {r["name"]: r for r in line["status"]["readers"]}["entry"]
            assert entry["last_read"] == granted["ts"]
            break
    stream.close()


def test_after_a_kill_the_next_agent_replaces_the_stale_socket(agent):
    agent.kill()
    assert socket_path(agent.state).exists()  # left behind by SIGKILL
    agent.start(timeout=60)
    wait_for(lambda: _answers(agent))
    assert console(agent, {"op": "status"})["status"]["mode"] == "normal"


def _answers(agent: AgentProcess) -> bool:
    try:
        return console(agent, {"op": "ping"})["ok"]
    except OSError:
        return False


# --- actions -------------------------------------------------------------------------------------


def test_a_console_mode_change_is_journalled_by_console_with_the_account(agent):
    reply = console(agent, {"op": "set_mode", "mode": "lockdown", "account": TECH})
    assert (reply["ok"], reply["op"], reply["result"]) == (True, "set_mode", "done")
    rec = reply["record"]
    assert (rec["type"], rec["account"], rec["action"], rec["args"], rec["result"]) == (
        "console.action", TECH, "set_mode", {"mode": "lockdown"}, "done")
    (changed,) = records_of(agent, "mode.changed", by="console")
    assert (changed["to"], changed["account"]) == ("lockdown", TECH)
    assert rec in agent.records()
    assert console(agent, {"op": "status"})["status"]["outputs"]["stop"] is True
    denied = agent.card(CARDS[1])["decision"]
    assert (denied["type"], denied["reason"]) == ("access.denied", "lockdown")  # the gate decides by it


def test_a_console_open_gives_grant_passage_and_timeout_with_source_console(agent):
    reply = console(agent, {"op": "open", "direction": "in", "account": "guard-1"})
    assert (reply["result"], reply["record"]["args"]) == ("done", {"direction": "in"})
    (granted,) = records_of(agent, "access.granted", source="console")
    assert (granted["account"], granted["direction"], granted["person"]) == ("guard-1", "in", None)
    agent.sim({"op": "pass", "side": "A"})
    wait_for(lambda: records_of(agent, "passage", source="console"))
    console(agent, {"op": "open", "direction": "out", "account": "guard-1"})
    (timeout,) = wait_for(lambda: records_of(agent, "passage.timeout", source="console"))  # wait_s 1 s
    assert timeout["direction"] == "out"


def test_a_led_pulse_drives_the_pin_then_leaves_it_inactive_and_turnstile_lines_are_refused(agent):
    reply = console(agent, {"op": "pulse", "line": "entry.led", "seconds": 5, "account": TECH})
    assert (reply["result"], reply["record"]["args"]) == ("done", {"line": "entry.led", "seconds": 5.0})
    # The reply comes after the gate drove the line: the pin is active now ...
    assert console(agent, {"op": "status"})["status"]["outputs"]["entry.led"] is True
    # ... and inactive again once its seconds ran out.
    wait_for(lambda: console(agent, {"op": "status"})["status"]["outputs"]["entry.led"] is False)
    for line, reason in (("unlock_a", "use_open"), ("unlock_b", "use_open"), ("stop", "safety_line"),
                         ("fire_release", "safety_line"), ("entry.horn", "unknown_line")):
        refused = console(agent, {"op": "pulse", "line": line, "account": TECH})
        assert (refused["ok"], refused["result"], refused["reason"]) == (True, "refused", reason), line
        assert refused["record"]["reason"] == reason
    st = console(agent, {"op": "status"})["status"]
    assert not any(st["outputs"].values())
    assert len(records_of(agent, "console.action", action="pulse", result="refused")) == 5
    assert not records_of(agent, "access.granted", source="console")  # no open by the back door


def test_a_card_read_during_a_led_pulse_does_not_cut_it_short(agent):
    """The card's own feedback blink ended with the line off while the core still held it on:
    the pulse went dark early and the next one said done but lit nothing."""
    def led() -> bool:
        return console(agent, {"op": "status"})["status"]["outputs"]["entry.led"]

    for _ in range(2):
        reply = console(agent, {"op": "pulse", "line": "entry.led", "seconds": 4, "account": TECH})
        assert reply["result"] == "done" and led()
        t0 = time.monotonic()
        assert agent.card(CARDS[1])["decision"]["type"] == "access.granted"  # its feedback: a blink
        agent.sim({"op": "pass", "side": "A"})
        while time.monotonic() - t0 < 2.0:  # well inside the pulse, past the card's blink
            time.sleep(0.1)
        assert led(), "the card's blink cut the pulse short"
        wait_for(lambda: not led())  # and it ends when its seconds ran out


def test_during_a_fire_a_mode_change_is_refused_and_an_open_is_done_with_the_gate_free(agent):
    console(agent, {"op": "pulse", "line": "exit.led", "seconds": 10, "account": TECH})
    agent.sim({"op": "fire", "loop": "open"})
    wait_for(lambda: console(agent, {"op": "status"})["status"]["mode"] == "fire")
    st = console(agent, {"op": "status"})["status"]
    assert st["fire"] == {"latched": True, "loop_open": True}
    assert st["inputs"]["fire_loop"]["active"] is True  # the input, live from the pin
    assert st["outputs"]["fire_release"] is True
    assert st["outputs"]["exit.led"] is False  # the alarm cut the pulse
    refused = console(agent, {"op": "set_mode", "mode": "normal", "account": TECH})
    assert (refused["result"], refused["reason"]) == ("refused", "fire")
    opened = console(agent, {"op": "open", "direction": "out", "account": TECH})
    assert opened["result"] == "done"
    assert not records_of(agent, "access.granted", source="console")  # free already: nothing to open
    assert console(agent, {"op": "status"})["status"]["mode"] == "fire"


def test_an_enroll_note_is_journalled(agent):
    reply = console(agent, {"op": "note", "action": "enroll", "account": TECH, "detail": "started"})
    assert (reply["result"], reply["record"]["action"], reply["record"]["args"]) == (
        "done", "enroll", {"detail": "started"})


def test_console_actions_reach_the_reference_ingest_as_contract_records(tmp_path, broker, ingest_at):
    ingest = ingest_at(broker)
    board = AgentProcess(tmp_path / "uplinked", broker=broker).start(timeout=60)
    try:
        wait_for(lambda: socket_path(board.state).exists())
        console(board, {"op": "set_mode", "mode": "entry_only", "account": TECH})
        console(board, {"op": "open", "direction": "in", "account": TECH})
        wait_for(lambda: len([e for e in ingest.events(board.site, board.gate)
                              if e["type"] == "console.action"]) == 2)
        stored = ingest.events(board.site, board.gate)
    finally:
        board.stop()
    actions = [e for e in stored if e["type"] == "console.action"]
    assert [(a["action"], a["account"], a["result"]) for a in actions] == [("set_mode", TECH, "done"),
                                                                           ("open", TECH, "done")]
    assert all(contract.validate("event", e) == [] for e in stored)
    (changed,) = [e for e in stored if e["type"] == "mode.changed" and e["by"] == "console"]
    assert changed["account"] == TECH
    assert [e["account"] for e in stored if e["type"] == "access.granted" and e.get("source") == "console"] == [TECH]
    assert ingest.conflicts() == []


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("data, code", [
    (b"not json\n", "bad_json"),
    (b"[1, 2]\n", "bad_json"),
    (b'{"op": "dance"}\n', "unknown_op"),
    (b'{"op": "set_mode", "mode": "lockdown", "account": "rm -rf"}\n', "bad_arg"),
    (b'{"op": "set_mode", "mode": "lockdown"}\n', "bad_arg"),
    (b'{"op": "set_mode", "mode": "fire", "account": "tech"}\n', "bad_arg"),
    (b'{"op": "open", "direction": "up", "account": "tech"}\n', "bad_arg"),
    (b'{"op": "pulse", "line": "entry.led", "seconds": 60, "account": "tech"}\n', "bad_arg"),
    (b'{"op": "note", "action": "enroll", "account": "tech", "detail": "' + b"x" * 201 + b'"}\n', "bad_arg"),
    (b'{"op": "note", "action": "delete", "account": "tech"}\n', "bad_arg"),
    ('{"op": "open", "direction": "in", "account": "' + "я" * 3 + '"}\n', "bad_arg"),
])
def test_bad_requests_are_refused_with_their_code_and_the_connection_goes_on(agent, data, code):
    raw = RawClient(socket_path(agent.state), timeout=WAIT_S)
    try:
        raw.send(data.encode() if isinstance(data, str) else data)
        reply = raw.reply()
        assert (reply["ok"], reply["error"]) == (False, code)
        assert reply["message"]
        raw.send(b'{"op": "ping"}\n')
        assert raw.reply() == {"ok": True, "op": "ping"}
    finally:
        raw.close()
    assert not records_of(agent, "console.action")  # nothing refused here reached the gate


def test_a_request_over_4096_bytes_is_refused_and_the_connection_closed(agent):
    raw = RawClient(socket_path(agent.state), timeout=WAIT_S)
    try:
        raw.send(b'{"op": "ping", "pad": "' + b"x" * 5000 + b'"}\n')
        reply = raw.reply()
        assert (reply["ok"], reply["error"]) == (False, "too_long")
        assert raw.reply() is None  # closed
    finally:
        raw.close()
    assert console(agent, {"op": "ping"})["ok"]  # the agent goes on


# --- in process: limits, peers, a slow watcher ---------------------------------------------------


class _Gate:
    """Stands in for the gate thread: journals a console.action for each event at once."""

    def __init__(self) -> None:
        self.server: ConsoleServer | None = None
        self.events: list = []

    def submit(self, event) -> bool:
        self.events.append(event)
        args = {"mode": event.mode} if hasattr(event, "mode") else {"detail": getattr(event, "detail", "")}
        action = "set_mode" if hasattr(event, "mode") else "enroll"
        self.server.on_record({"type": "console.action", "account": event.account, "action": action,
                               "args": args, "result": "done"})
        return True


def _server(tmp_path: Path, **kw) -> tuple[ConsoleServer, _Gate]:
    gate = _Gate()
    server = ConsoleServer(tmp_path / "console.sock", submit=gate.submit, status=lambda: {"mode": "normal"}, **kw)
    gate.server = server
    server.start()
    return server, gate


def test_more_than_five_actions_a_second_are_told_busy(tmp_path):
    server, gate = _server(tmp_path, clock=lambda: 1000.0)  # time stands still: no token comes back
    try:
        replies = [request(server.path, {"op": "note", "action": "enroll", "account": "tech", "detail": str(i)})
                   for i in range(7)]
    finally:
        server.stop()
    assert [r.get("result") for r in replies[:5]] == ["done"] * 5
    assert [(r["ok"], r["error"]) for r in replies[5:]] == [(False, "busy")] * 2
    assert len(gate.events) == 5  # a busy action never reaches the gate


def test_peer_credentials_are_read_and_another_user_is_refused():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        me = os.geteuid()
        assert peer_uid(a) == me
        assert peer_allowed(a) == (True, me)
        assert peer_allowed(a, me + 1, allow_root=False) == (False, me)
        assert peer_allowed(a, me + 1, allow_root=True) == (me == 0, me)
    finally:
        a.close()
        b.close()


def test_a_connection_from_a_wrong_uid_is_closed_without_an_answer(tmp_path):
    server, gate = _server(tmp_path, uid=os.geteuid() + 4242, allow_root=False)
    try:
        raw = RawClient(server.path, timeout=WAIT_S)
        try:
            raw.send(b'{"op": "set_mode", "mode": "free", "account": "tech"}\n')
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before the request arrived: that is the point
        assert raw.reply() is None
        raw.close()
        assert server.counters["wrong_peer"] == 1 and gate.events == []
    finally:
        server.stop()
    assert not server.path.exists()  # removed at stop


def test_the_ninth_connection_is_told_busy(tmp_path):
    server, _gate = _server(tmp_path)
    clients = []
    try:
        for _ in range(8):
            raw = RawClient(server.path, timeout=WAIT_S)
            raw.send(b'{"op": "ping"}\n')
            assert raw.reply()["ok"]
            clients.append(raw)
        ninth = RawClient(server.path, timeout=WAIT_S)
        reply = ninth.reply()
        assert (reply["ok"], reply["error"]) == (False, "busy")
        ninth.close()
    finally:
        for raw in clients:
            raw.close()
        server.stop()


def test_a_slow_watcher_gets_a_gap_and_the_gate_never_waits_for_it(tmp_path, services):
    from tests.test_simctl import CARD, make_agent, sim

    svc = services(make_agent(tmp_path))
    slow = RawClient(socket_path(svc.config.service.state_dir), timeout=WAIT_S)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.send(b'{"op": "watch"}\n')  # ... and reads nothing more for now
    wait_for(lambda: svc.consolesock is not None and svc.consolesock._watchers)
    flood = 4000
    for i in range(0, flood, 500):  # the downlink lane holds 1000
        for j in range(i, i + 500):
            assert svc.runtime.submit(Report("alarm", {"kind": "console_test", "active": j % 2 == 0}))
        assert svc.runtime.wait_idle(WAIT_S)
    decision = sim(svc, op="card", reader="entry", card=CARD)["decision"]
    assert decision is not None and decision["type"] == "access.granted"  # the gate still decides
    assert svc.runtime.counters["hook_errors"] == 0
    gaps, records = 0, 0
    while True:  # now read: what was queued, the gap, then a status once the queue ran dry
        line = slow.reply()
        assert line is not None, "the watcher was closed"
        gaps += line.get("gap", 0)
        records += "record" in line
        if gaps and "status" in line:
            break
    assert gaps > 0
    assert records + gaps >= flood  # every record was either sent or counted as dropped
    again = sim(svc, op="card", reader="entry", card=CARD)["decision"]
    while True:  # the stream goes on after its gap
        line = slow.reply()
        assert line is not None, "the watcher was closed"
        if "record" in line and line["record"]["id"] == again["id"]:
            break
    slow.close()


def test_the_agent_with_the_console_socket_taken_by_a_file_still_starts(tmp_path, services):
    from tests.test_simctl import CARD, make_agent, sim

    config = make_agent(tmp_path)
    (tmp_path / "state" / "console.sock").write_text("not a socket")
    svc = services(config)
    assert svc.consolesock is None  # logged; the gate works without it
    assert sim(svc, op="card", reader="entry", card=CARD)["decision"]["type"] == "access.granted"
    assert (tmp_path / "state" / "console.sock").read_text() == "not a socket"


def test_a_pulse_running_when_the_gate_thread_stops_is_cut_at_once(tmp_path, services):
    from tests.test_simctl import make_agent

    svc = services(make_agent(tmp_path))
    path = socket_path(svc.config.service.state_dir)
    assert request(path, {"op": "pulse", "line": "entry.led", "seconds": 10, "account": TECH})["result"] == "done"
    spec = svc.config.hardware.board.readers["entry"].led
    pin = svc.factory.pin(f"GPIO{spec.pin}")
    assert pin.state == spec.active_high  # on
    svc.runtime.stop()  # as the agent's stop does, before the pins are released
    assert pin.state != spec.active_high  # off, 10 s early
