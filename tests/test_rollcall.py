# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""The fire roll-call (docs/presence.md#the-fire-roll-call): the gate journals who was
inside when the fire loop opened (one ``rollcall`` record, right after the release),
tracks who leaves during the alarm, and `gate-agent rollcall` prints three lists.

The core on both twins; the service on mock pins with a real journal, a real
mosquitto and the reference ingest; the tool's text and CSV.
"""
from __future__ import annotations

import json
import random
import time

from agent import cli, contract
from agent.core import events as ev
from agent.core.acl import AccessList, build_table
from agent.core.cards import encode_w26
from agent.core.presence import Presence
from agent.presencefile import PresenceFile
from tests.agentproc import journal_records
from tests.broker import broker, ingest_at, make_broker, wait_until  # noqa: F401
from tests.test_presence import names_file
from tests.test_service import acl_snapshot, drive_input, line_active, w26_edges, write_config
from tests.test_turnstile import (
    ALICE,
    BOB,
    CAROL,
    K_ALICE,
    K_BLOCKED,
    K_BOB,
    K_CAROL,
    MONO0,
    WALL0,
    at,
    card,
    columns,
    make,
    only,
    types,
)

# --- the core, both twins --------------------------------------------------------------------


def entered(run, t: float, key: int) -> None:
    run(t, card(key))
    run(t + 1, ev.PassSensor("A"))


def test_the_fire_loop_journals_who_is_inside_right_after_the_release(fp):
    run = make(fp, gate="gate-1")
    entered(run, 1, K_ALICE)
    entered(run, 3, K_CAROL)
    fire = run(10, ev.FireLoop(open=True))
    assert types(fire) == ["alarm.fire", "mode.changed"]  # nothing holds the release back
    assert run.gate.outputs["fire_release"] and run.gate.next_deadline() == MONO0 + 10
    rollcall = only(run.tick_deadline(), "rollcall")
    assert (rollcall["by"], rollcall["gate"], rollcall["count"], rollcall["inside"]) == \
        ("fire_loop", "gate-1", 2, [ALICE, CAROL])
    assert contract.validate("event", run.records[-1]) == []
    assert run.gate.next_deadline() is None
    # One per alarm: the loop closing and opening again before the reset takes no new one.
    run(20, ev.FireLoop(open=False))
    run(21, ev.FireLoop(open=True))
    run(22, ev.Tick())
    assert [r["type"] for r in run.records].count("rollcall") == 1


def test_exits_during_the_alarm_are_tracked_until_the_reset(fp):
    run = make(fp)
    for i, key in enumerate((K_ALICE, K_BOB, K_CAROL)):
        run(1 + i * 2, card(key))
        run(2 + i * 2, ev.PassSensor("A"))
    assert run.gate.presence.inside() == [ALICE, BOB, CAROL]
    run(10, ev.FireLoop(open=True))
    run(10, ev.Tick())
    run(11, card(K_ALICE, "exit"))  # evacuating: read with no check
    run(11.5, ev.PassSensor("B"))  # a free passage names nobody
    run(12, ev.PassSensor("B"))  # nor does a pupil who did not show a card
    rc = run.gate.presence.rollcall
    assert rc.active and list(rc.left) == [ALICE]
    assert rc.not_seen_leaving() == [BOB, CAROL]
    run(13, card(K_ALICE, "entry"))  # went back in (a teacher looking for someone)
    assert rc.not_seen_leaving() == [ALICE, BOB, CAROL] and rc.left == {}
    run(14, card(K_ALICE, "exit"))
    run(20, ev.FireLoop(open=False))
    run(21, ev.FireReset(by="input"))
    assert not rc.active and rc.ended == WALL0 + 21
    run(22, card(K_CAROL, "exit"))  # after the reset: a normal exit, not part of the roll-call
    run(23, ev.PassSensor("B"))
    assert list(rc.left) == [ALICE] and run.gate.presence.inside() == [BOB]


def test_a_blocked_card_read_in_fire_says_nothing_about_its_owner(fp):
    from array import array

    from fastpath import codes
    from fastpath.columns import TableColumns

    cols = columns()
    run = make(fp)
    entered(run, 1, K_BOB)
    flags = array("B", cols.card_flags)
    flags[1] = codes.CARD_BLOCKED  # Bob lost his card after coming in; it is still listed on him
    run(3, ev.SwapTable(table=fp.Table(TableColumns(**{**cols.__dict__, "card_flags": flags}))))
    run(10, ev.FireLoop(open=True))
    run(10, ev.Tick())
    for key in (K_BOB, K_BLOCKED):
        assert only(run(11, card(key, "exit")), "access.granted")["person"] is None
    assert run.gate.presence.rollcall.not_seen_leaving() == [BOB]  # still to be found


def test_a_siblings_alarm_opens_this_gates_rollcall_and_its_reset_closes_it(fp):
    run = make(fp, gate="gate-1")
    entered(run, 1, K_ALICE)
    alarm = {"type": "alarm.fire", "active": True, "ts": "2026-09-07T08:00:09.500Z"}
    assert run.gate.apply_sibling(alarm, "gate-2", at(10))
    assert run.gate.mode == "normal"  # a sibling's alarm does not free this gate: its own loop does
    rollcall = only(run.tick_deadline(), "rollcall")
    assert (rollcall["by"], rollcall["gate"], rollcall["inside"]) == ("site", "gate-2", [ALICE])
    # Evacuating through gate 2: its fire-mode read reaches this gate's roll-call.
    read = {"type": "access.granted", "check": "none", "direction": "out", "person": ALICE,
            "ts": "2026-09-07T08:00:12.000Z", "reader": "exit", "card": K_ALICE, "format": "w26"}
    assert run.gate.apply_sibling(read, "gate-2", at(12))
    assert list(run.gate.presence.rollcall.left) == [ALICE]
    # Gate 3's alarm while the roll-call is open opens none; gate 3's reset does not close it.
    assert not run.gate.apply_sibling({**alarm, "ts": "2026-09-07T08:00:13.000Z"}, "gate-3", at(13))
    reset = {"type": "mode.changed", "from": "fire", "to": "normal", "by": "fire_reset",
             "ts": "2026-09-07T08:10:00.000Z"}
    assert not run.gate.apply_sibling(reset, "gate-3", at(600))
    assert run.gate.apply_sibling(reset, "gate-2", at(600))
    assert not run.gate.presence.rollcall.active


def test_a_siblings_alarm_applied_inside_a_step_journals_the_rollcall_in_that_step(fp):
    run = make(fp, gate="gate-1")
    entered(run, 1, K_CAROL)
    step = ev.Step()
    alarm = {"type": "rollcall", "by": "fire_loop", "gate": "gate-3", "count": 1, "inside": [CAROL],
             "ts": "2026-09-07T08:00:09.000Z"}
    assert run.gate.apply_sibling(alarm, "gate-3", at(10), step)
    assert [(r["type"], r["by"], r["gate"], r["inside"]) for r in step.records] == \
        [("rollcall", "site", "gate-3", [CAROL])]
    assert run.gate.next_deadline() is None  # nothing left to journal


def test_a_siblings_old_alarm_delivered_late_opens_no_rollcall(fp):
    run = make(fp, gate="gate-1")
    old = {"type": "rollcall", "by": "fire_loop", "gate": "gate-2", "count": 0, "inside": [],
           "ts": "2026-09-07T07:00:00.000Z"}  # an hour before: the gate was offline
    assert not run.gate.apply_sibling(old, "gate-2", at(10))
    assert run.gate.presence.rollcall is None and run.gate.next_deadline() is None


# --- the service: mock pins, a real journal, the broker and the ingest ------------------------------


CARD = (100, 60179)  # tests.test_service's card of its PERSON "p-1"


def swap_list(svc) -> None:
    table = build_table(AccessList.from_snapshot(acl_snapshot()), svc.gate._fp)
    svc.runtime.submit(ev.SwapTable(table=table, kind="snapshot", timezone="UTC"))
    wait_until(lambda: getattr(svc.gate.table, "version", "") == "t.1", what="the list applied")


def read_card(svc, reader: str) -> None:
    svc.readers[reader].feed_edges(w26_edges(encode_w26(*CARD), time.monotonic(), random.Random(1)))


def test_a_fire_drill_on_the_service_journals_the_rollcall_and_tracks_the_exits(
        tmp_path, broker, ingest_at, services, capsys):
    ingest = ingest_at(broker)
    config = write_config(tmp_path, broker=broker)
    svc = services(config)
    swap_list(svc)
    read_card(svc, "entry")
    wait_until(lambda: svc.gate.pending is not None, what="the grant")
    drive_input(svc, "pass_a", True)
    drive_input(svc, "pass_a", False)
    wait_until(lambda: svc.gate.presence.inside() == ["p-1"], what="p-1 inside")

    drive_input(svc, "fire_loop", True)
    wait_until(lambda: line_active(svc, "fire_release"), what="the release driven by the fire loop")
    wait_until(lambda: any(r["type"] == "rollcall" for r in journal_records(tmp_path / "data" / "journal.db")),
               what="the rollcall record journalled")
    read_card(svc, "exit")  # evacuating
    wait_until(lambda: list(svc.gate.presence.rollcall.left) == ["p-1"], what="p-1 seen leaving")
    presence_file = tmp_path / "state" / "presence.json"
    wait_until(lambda: presence_file.exists() and json.loads(presence_file.read_text())["rollcall"]["left"],
               what="the roll-call in the presence file")

    def stored(rtype):
        return [e for e in ingest.events("school7", "gate1") if e["type"] == rtype]

    wait_until(lambda: stored("rollcall"), timeout=15, what="the rollcall at the ingest")
    rc = stored("rollcall")[0]
    assert (rc["by"], rc["gate"], rc["count"], rc["inside"]) == ("fire_loop", "gate1", 1, ["p-1"])
    records = journal_records(tmp_path / "data" / "journal.db")
    order = [r["type"] for r in records]
    assert order.index("mode.changed") < order.index("rollcall")
    assert contract.validate("event", records[order.index("rollcall")]) == []

    # The guard's lists, from the file only.
    assert cli.main(["rollcall", "--config", str(config), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "list,person,name,time"
    assert [r.split(",")[:2] for r in rows[1:]] == [["inside_at_alarm", "p-1"], ["left", "p-1"]]

    # A restart in the middle of the alarm keeps the roll-call open and who left.
    svc.stop()
    again = services(config)
    assert again.gate.mode == "fire"
    rc = again.gate.presence.rollcall
    assert rc.active and list(rc.left) == ["p-1"] and rc.inside == ("p-1",)
    assert again.gate.presence.counts() == {"inside": 0, "seen": 1, "left": 1}
    drive_input(again, "fire_loop", False)
    drive_input(again, "fire_reset", True)
    drive_input(again, "fire_reset", False)
    wait_until(lambda: not again.gate.presence.rollcall.active, what="the roll-call closed by the reset")
    again.stop()
    assert [r["type"] for r in journal_records(tmp_path / "data" / "journal.db")].count("rollcall") == 1


# --- gate-agent rollcall ---------------------------------------------------------------------------


def drill_file(tmp_path):
    p = Presence()
    p.roll(WALL0, "UTC")
    for i, person in enumerate(("p-0042", "p-0107", "p-0311")):
        p.apply(person, True, WALL0 + i, "UTC")
    p.open_rollcall(WALL0 + 60, "fire_loop", "gate-1")
    p.apply("p-0107", False, WALL0 + 75, "UTC")
    p.apply("p-0999", True, WALL0 + 80, "UTC")  # came in during the alarm
    pf = PresenceFile(tmp_path / "presence.json", site="school7", gate="gate-1")
    assert pf.save(p, WALL0 + 90)
    return tmp_path / "presence.json"


def test_rollcall_prints_the_three_lists(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("time.time", lambda: WALL0 + 100)
    path = drill_file(tmp_path)
    names = names_file(tmp_path, "p-0042;Иванов Иван;5Б\np-0107;Петрова Анна;7А\n")
    assert cli.main(["rollcall", "--file", str(path), "--names", str(names)]) == 0
    out = capsys.readouterr().out
    assert "Roll-call: fire alarm at 2026-09-07 08:01:00 (this gate's fire loop)" in out
    inside, rest = out.split("Inside at the alarm: 3\n")[1].split("Left since: 1\n")
    left, missing = rest.split("Not yet seen leaving: 3\n")
    assert [ln.split()[0] for ln in inside.strip().splitlines()] == ["p-0042", "p-0107", "p-0311"]
    assert "p-0107  Петрова Анна 7А  left at 08:01:15" in left
    assert [ln.split()[0] for ln in missing.strip().splitlines()] == ["p-0042", "p-0311", "p-0999"]
    assert "p-0999  came in at 08:01:20" in missing


def test_rollcall_as_csv_to_print(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("time.time", lambda: WALL0 + 100)
    path = drill_file(tmp_path)
    assert cli.main(["rollcall", "--file", str(path), "--csv"]) == 0
    rows = [r.split(",") for r in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows if r[0] == "not_seen_leaving"] == [
        ("not_seen_leaving", "p-0042"), ("not_seen_leaving", "p-0311"), ("not_seen_leaving", "p-0999")]
    assert ["left", "p-0107", "", "2026-09-07T08:01:15+00:00"] in rows


def test_rollcall_before_any_alarm_says_so(tmp_path, capsys):
    pf = PresenceFile(tmp_path / "presence.json")
    p = Presence()
    p.roll(WALL0, "UTC")
    pf.save(p, WALL0)
    assert cli.main(["rollcall", "--file", str(tmp_path / "presence.json")]) == 1
    assert "no roll-call yet" in capsys.readouterr().err


def test_kill_9_in_the_middle_of_a_drill_keeps_the_rollcall_for_the_guard(tmp_path, capsys):
    """The real agent in its own process, driven through its sim socket, killed with SIGKILL
    after the evacuee's exit was saved: the next start has the roll-call as it was."""
    from tests.agentproc import AgentProcess

    agent = AgentProcess(tmp_path / "board").start()
    try:
        for card_ in ("100,60000", "100,60001"):
            assert agent.card(card_)["decision"]["type"] == "access.granted"
            agent.sim({"op": "pass", "side": "A"})
        agent.sim({"op": "fire", "loop": "open"})
        agent.card("100,60001", reader="exit")  # p-1 evacuates
        path = agent.state / "presence.json"
        wait_until(lambda: path.exists() and "p-1" in json.loads(path.read_text())["rollcall"]["left"],
                   what="p-1's exit saved")
        agent.kill()
        agent.start()
        wait_until(lambda: any(r["type"] == "mode.changed" and r["by"] == "restored" for r in agent.records()),
                   what="the restart")
    finally:
        agent.stop()
    assert cli.main(["rollcall", "--file", str(path), "--csv"]) == 0
    rows = [r.split(",")[:2] for r in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["inside_at_alarm", "p-0"], ["inside_at_alarm", "p-1"], ["left", "p-1"],
                    ["not_seen_leaving", "p-0"]]
    assert [r["type"] for r in agent.records()].count("rollcall") == 1
