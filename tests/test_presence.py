"""Presence (agent/core/presence.py, docs/presence.md): who is inside now.

The model on its own with an injected clock (the nightly reset, the order
rule for a sibling's records, its bounds), the gate feeding it its own
passages on both fastpath twins, a sibling's records through
Gate.apply_sibling, the file the service keeps (agent/presencefile.py) and
`gate-agent presence`.
"""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from agent import cli
from agent.core import events as ev
from agent.core import presence as presence_mod
from agent.core.events import Now
from agent.core.gateconfig import GateConfig, GateConfigError
from agent.core.presence import Presence, next_reset, parse_reset, presence_day
from agent.presencefile import PresenceFile
from agent.tools.presence import load_names, read_presence
from tests.test_turnstile import ALICE, BOB, CAROL, K_ALICE, K_BOB, K_CAROL, WALL0, at, card, make

TZ = "Asia/Tomsk"  # UTC+7, no summer time
ZONE = ZoneInfo(TZ)


def local(text: str) -> float:
    """Epoch seconds of a local time in TZ, "2026-09-01 07:45"."""
    return datetime.fromisoformat(text).replace(tzinfo=ZONE).timestamp()


# --- the model ---------------------------------------------------------------------------------


def test_entries_and_exits_make_who_is_inside():
    p = Presence()
    t = local("2026-09-01 07:40")
    p.roll(t, TZ)
    assert p.apply("p-1", True, t, TZ) and p.apply("p-2", True, t + 1, TZ)
    assert p.apply("p-1", False, t + 60, TZ)
    assert p.inside() == ["p-2"]
    assert p.counts() == {"inside": 1, "seen": 2, "left": 1}


def test_the_nightly_reset_clears_a_missed_exit_at_the_configured_local_time():
    p = Presence("03:00")
    p.roll(local("2026-09-01 08:00"), TZ)
    p.apply("p-1", True, local("2026-09-01 08:00"), TZ)  # never seen leaving
    assert p.resets_at == local("2026-09-02 03:00")
    assert not p.roll(local("2026-09-02 02:59"), TZ)  # still the same presence day
    assert p.inside() == ["p-1"]
    assert p.roll(local("2026-09-02 03:00"), TZ)
    assert p.inside() == [] and p.resets_at == local("2026-09-03 03:00")


def test_a_reset_time_after_midnight_counts_the_small_hours_to_the_day_before():
    reset = parse_reset("05:30")
    assert presence_day(local("2026-09-02 05:29"), TZ, reset) == datetime(2026, 9, 1).toordinal()
    assert presence_day(local("2026-09-02 05:30"), TZ, reset) == datetime(2026, 9, 2).toordinal()
    assert next_reset(datetime(2026, 9, 1).toordinal(), TZ, reset) == local("2026-09-02 05:30")


@pytest.mark.parametrize("bad", ["3:00", "24:00", "03:60", "", None, 300, "03:00:00"])
def test_a_bad_reset_time_is_refused_saying_what_is_allowed(bad):
    with pytest.raises(ValueError, match="HH:MM"):
        parse_reset(bad)
    with pytest.raises(GateConfigError, match="presence_reset"):
        GateConfig(presence_reset=bad)


def test_a_passage_of_another_presence_day_changes_nothing():
    p = Presence()
    p.roll(local("2026-09-02 08:00"), TZ)
    assert not p.apply("p-1", True, local("2026-09-01 15:00"), TZ)  # yesterday's, delivered late
    assert p.inside() == []


def test_a_siblings_older_record_never_undoes_a_newer_passage_and_twice_is_once():
    p = Presence()
    t = local("2026-09-01 08:00")
    p.roll(t, TZ)
    assert p.apply("p-1", False, t + 30, TZ, gate="gate-2")  # left at gate 2
    assert not p.apply("p-1", True, t, TZ, gate="gate-3")  # entered at gate 3 earlier: arrives late
    assert p.inside() == []
    assert not p.apply("p-1", False, t + 30, TZ, gate="gate-2")  # the same record again
    assert p.apply("p-1", True, t + 40, TZ, gate="gate-3")
    assert p.inside() == ["p-1"]


def test_every_gate_that_applied_the_same_passages_holds_the_same_presence_whatever_the_order():
    import random

    t = local("2026-09-01 08:00")
    passages = [(f"p-{i % 7}", bool(i % 3), t + i // 2, f"gate-{i % 3 + 1}") for i in range(60)]
    held = []
    for seed in range(5):
        order = passages[:]
        random.Random(seed).shuffle(order)
        p = Presence()
        p.roll(t, TZ)
        for person, inside, wall, gate in order:
            p.apply(person, inside, wall, TZ, gate=gate)
        held.append(p.to_dict()["people"])
    assert all(h == held[0] for h in held) and held[0]


def test_records_move_only_named_card_passages_and_fire_reads():
    p = Presence()
    t = WALL0
    p.roll(t, "UTC")
    ts = "2026-09-07T08:00:05.000Z"
    base = {"ts": ts, "direction": "in", "person": "p-1"}
    assert not p.apply_record({**base, "type": "passage", "source": "button"}, "UTC")
    assert not p.apply_record({**base, "type": "access.granted"}, "UTC")  # a grant is not a passage
    assert not p.apply_record({**base, "type": "passage", "source": "card", "person": None}, "UTC")
    assert not p.apply_record({**base, "type": "passage", "source": "card", "ts": "yesterday"}, "UTC")
    assert not p.apply_record(["not", "a", "record"], "UTC")
    assert p.apply_record({**base, "type": "passage", "source": "card"}, "UTC")
    assert p.apply_record({**base, "type": "access.granted", "check": "none", "direction": "out",
                           "ts": "2026-09-07T08:00:09.000Z"}, "UTC")
    assert p.inside() == [] and p.counts()["seen"] == 1


def test_presence_is_bounded_and_counts_who_it_could_not_track(monkeypatch):
    monkeypatch.setattr(presence_mod, "MAX_PEOPLE", 3)
    p = Presence()
    p.roll(WALL0, "UTC")
    for i in range(5):
        p.apply(f"p-{i}", True, WALL0 + i, "UTC", gate="forged")
    assert p.inside() == ["p-0", "p-1", "p-2"] and p.dropped == 2
    assert not p.apply("x" * 129, True, WALL0 + 9, "UTC")  # not a person id


def test_presence_round_trips_and_a_damaged_one_is_refused():
    p = Presence("04:15")
    p.roll(WALL0, TZ)
    p.apply("p-1", True, WALL0, TZ)
    p.apply("p-2", True, WALL0 + 1, TZ, gate="gate-2")
    p.open_rollcall(WALL0 + 2, "fire_loop", "gate-1")
    p.apply("p-2", False, WALL0 + 3, TZ)
    doc = json.loads(json.dumps(p.to_dict()))
    again = Presence.from_dict(doc, "04:15")
    assert again.to_dict() == p.to_dict()
    for broken in ({**doc, "format": 9}, {**doc, "people": {"p-1": [2, 0, ""]}}, {**doc, "day": 5},
                   {**doc, "rollcall": {"by": "panic"}}, {**doc, "timezone": "Mars/Olympus"}, []):
        with pytest.raises(ValueError):
            Presence.from_dict(broken)


# --- the gate feeds it, both twins --------------------------------------------------------------


def test_the_gate_counts_its_own_card_passages_and_nobody_for_a_button(fp):
    run = make(fp)
    run(1, card(K_ALICE))
    run(2, ev.PassSensor("A"))
    run(3, card(K_CAROL))
    run(4, ev.PassSensor("A"))
    assert run.gate.presence.inside() == [ALICE, CAROL]
    run(5, card(K_CAROL, "exit"))
    run(6, ev.PassSensor("B"))
    run(7, ev.Button("in"))
    run(8, ev.PassSensor("A"))  # the guard let someone in: nobody named
    run(9, card(K_BOB))
    run(20, ev.Tick())  # Bob's grant timed out: he never came in
    assert run.gate.presence.inside() == [ALICE]


def test_the_gate_resets_presence_at_its_configured_time_in_the_lists_zone(fp):
    # WALL0 is Monday 08:00 UTC = 15:00 in Tomsk: the reset at 04:00 Tomsk is 13 h later.
    run = make(fp, presence_reset="04:00", timezone=TZ)
    run(1, card(K_ALICE))
    run(2, ev.PassSensor("A"))
    assert run.gate.presence.inside() == [ALICE]
    run(13 * 3600 - 1, ev.Tick())
    assert run.gate.presence.inside() == [ALICE]
    run(13 * 3600, ev.Tick())
    assert run.gate.presence.inside() == []


def test_a_siblings_passage_counts_here_and_the_gates_own_echo_does_not(fp):
    run = make(fp, gate="gate-1")
    gate = run.gate
    ts = "2026-09-07T08:00:01.000Z"
    rec = {"type": "passage", "ts": ts, "direction": "in", "source": "card", "person": BOB, "card": K_BOB}
    assert gate.apply_sibling(rec, "gate-2", at(2))
    assert not gate.apply_sibling(rec, "gate-2", at(3))  # the same record again
    assert gate.presence.inside() == [BOB]
    own = {**rec, "direction": "out", "ts": "2026-09-07T08:00:02.000Z"}
    assert not gate.apply_sibling(own, "gate-1", at(3))  # its own, back from the site's topic
    assert not gate.apply_sibling({"type": "passage"}, "gate-2", at(3))
    assert not gate.apply_sibling("garbage", "gate-2", at(3))  # type: ignore[arg-type]
    assert gate.presence.inside() == [BOB]


# --- on disk ----------------------------------------------------------------------------------


def now_at(wall: float, mono: float = 100.0) -> Now:
    return Now(mono=mono, wall=wall)


def test_the_presence_file_survives_a_restart_privately(tmp_path):
    path = tmp_path / "presence.json"
    pf = PresenceFile(path, site="s", gate="g", interval_s=5)
    p = pf.load("03:00")
    p.roll(WALL0, "UTC")
    p.apply("p-1", True, WALL0, "UTC")
    assert pf.maybe_save(p, now_at(WALL0))
    pf.close()
    assert path.stat().st_mode & 0o777 == 0o600
    again = PresenceFile(path).load("03:00")
    assert again.inside() == ["p-1"]
    doc = json.loads(path.read_text())
    assert (doc["site"], doc["gate"], doc["day"]) == ("s", "g", "2026-09-07")


def test_the_file_is_written_at_most_every_interval_but_a_rollcall_at_once(tmp_path):
    pf = PresenceFile(tmp_path / "presence.json", interval_s=5)
    p = pf.load("03:00")
    p.roll(WALL0, "UTC")
    p.apply("p-1", True, WALL0, "UTC")
    assert pf.maybe_save(p, now_at(WALL0, 100))
    assert not pf.maybe_save(p, now_at(WALL0, 101))  # unchanged
    p.apply("p-2", True, WALL0 + 1, "UTC")
    assert not pf.maybe_save(p, now_at(WALL0, 101))  # changed, but within the interval
    p.open_rollcall(WALL0 + 2, "fire_loop", "g")
    assert pf.maybe_save(p, now_at(WALL0, 102))  # the roll-call: at once
    pf.close()
    assert PresenceFile(tmp_path / "presence.json").load("03:00").rollcall.inside == ("p-1", "p-2")


def test_a_damaged_presence_file_is_moved_aside_and_presence_starts_empty(tmp_path):
    path = tmp_path / "presence.json"
    path.write_text('{"format": 1, "people": {"p-1": "inside"}}')
    p = PresenceFile(path).load("03:00")
    assert p.inside() == [] and not path.exists()
    assert (tmp_path / "presence.json.corrupt-1").exists()


def test_the_gate_thread_never_writes_the_file_itself(tmp_path, monkeypatch):
    pf = PresenceFile(tmp_path / "presence.json", interval_s=0.5)
    gate_thread = threading.get_ident()
    writers = []
    import agent.presencefile as module

    real = module.write_atomic
    monkeypatch.setattr(module, "write_atomic", lambda *a, **k: (writers.append(threading.get_ident()),
                                                                 real(*a, **k)))
    p = pf.load("03:00")
    p.roll(WALL0, "UTC")
    p.apply("p-1", True, WALL0, "UTC")
    pf.maybe_save(p, now_at(WALL0))
    pf.close()
    assert writers and gate_thread not in writers


def test_a_read_only_state_directory_costs_the_save_not_the_gate(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anyway")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        pf = PresenceFile(d / "presence.json")
        p = pf.load("03:00")
        p.roll(WALL0, "UTC")
        assert pf.save(p, WALL0) is False and pf.errors == 1
    finally:
        d.chmod(0o700)


# --- gate-agent presence --------------------------------------------------------------------------


def saved(tmp_path: Path, p: Presence, wall: float = WALL0, gate: str = "gate-1") -> Path:
    pf = PresenceFile(tmp_path / "presence.json", site="school7", gate=gate)
    assert pf.save(p, wall)
    return tmp_path / "presence.json"


def names_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "names.csv"
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


def three_inside() -> Presence:
    p = Presence()
    p.roll(WALL0, "UTC")
    for i, person in enumerate(("p-0042", "p-0107", "p-0311", "p-0500")):
        p.apply(person, True, WALL0 + i, "UTC", gate="gate-1" if i % 2 else "gate-2")
    p.apply("p-0500", False, WALL0 + 10, "UTC")
    return p


def test_presence_prints_counts_and_the_list_with_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("time.time", lambda: WALL0 + 60)
    path = saved(tmp_path, three_inside())
    names = names_file(tmp_path, "person;name;class\np-0042;Иванов Иван;5Б\np-0107;Петрова Анна;7А\n")
    assert cli.main(["presence", "--file", str(path), "--names", str(names)]) == 0
    out = capsys.readouterr().out
    assert "inside: 3; left: 1; seen this day: 4" in out
    assert "p-0042  Иванов Иван 5Б" in out and "p-0311" in out and "p-0500" not in out
    assert "(gate gate-2)" in out and "(gate gate-1)" in out


def test_presence_as_csv_for_a_spreadsheet(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("time.time", lambda: WALL0 + 60)
    path = saved(tmp_path, three_inside())
    assert cli.main(["presence", "--file", str(path), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == "person,name,since,gate"
    assert sorted(r.split(",")[0] for r in rows[1:]) == ["p-0042", "p-0107", "p-0311"]
    assert "p-0042,,2026-09-07T08:00:00+00:00,gate-2" in rows


def test_presence_saved_before_the_nightly_reset_shows_nobody_inside(tmp_path, capsys):
    path = saved(tmp_path, three_inside())
    view = read_presence(path, now=WALL0 + 86400)  # the next morning, nobody passed overnight
    assert view["stale"] and view["people"] == {}
    assert read_presence(path, now=WALL0 + 60)["people"]


def test_presence_reads_the_state_directory_from_the_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("time.time", lambda: WALL0 + 60)
    (tmp_path / "state").mkdir()
    saved(tmp_path / "state", three_inside())
    config = tmp_path / "agent.toml"
    config.write_text('[service]\nstate_dir = "state"\n')
    assert cli.main(["presence", "--config", str(config)]) == 0
    assert "inside: 3" in capsys.readouterr().out


def test_presence_without_a_file_says_what_to_check(tmp_path, capsys):
    assert cli.main(["presence", "--file", str(tmp_path / "none.json")]) == 1
    assert "is the service running" in capsys.readouterr().err


def test_a_damaged_presence_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "presence.json"
    bad.write_text("{torn")
    assert cli.main(["presence", "--file", str(bad)]) == 2
    assert "is not a presence file" in capsys.readouterr().err


def test_a_names_file_others_can_read_is_refused(tmp_path, capsys):
    path = saved(tmp_path, three_inside())
    names = names_file(tmp_path, "p-0042;Иванов Иван\n", mode=0o644)
    assert cli.main(["presence", "--file", str(path), "--names", str(names)]) == 2
    err = capsys.readouterr().err
    assert "chmod 600" in err and "Иванов" not in err


def test_the_names_file_takes_the_schools_export_as_it_comes(tmp_path):
    # Excel's "CSV UTF-8" starts with a BOM; commas or tabs work as well as semicolons.
    names = names_file(tmp_path, "\ufeffperson,name\n# a comment\np-1,\"Smith, John\"\n\np-2,Ann\n")
    assert load_names(names) == {"p-1": "Smith, John", "p-2": "Ann"}
    tabs = names_file(tmp_path, "p-1\tИванов Иван\t5Б\n")
    assert load_names(tabs) == {"p-1": "Иванов Иван 5Б"}
    latin1 = tmp_path / "names.csv"
    latin1.write_bytes("p-1;Jos\xe9\n".encode("latin-1"))
    latin1.chmod(0o600)
    with pytest.raises(Exception, match="UTF-8"):
        load_names(latin1)


def test_presence_speaks_russian(tmp_path, capsys, monkeypatch):
    from agent import i18n

    monkeypatch.setattr("time.time", lambda: WALL0 + 60)
    path = saved(tmp_path, three_inside())
    i18n.set_language("ru")
    try:
        assert cli.main(["presence", "--file", str(path)]) == 0
    finally:
        i18n.set_language(None)
    out = capsys.readouterr().out
    assert "на территории: 3" in out



@pytest.mark.parametrize("wall", [1e13, 253402300800.0, -1e12])
def test_a_wall_clock_no_date_can_hold_leaves_presence_as_it_was(wall):
    """Presence runs in the same step as a fire loop's release: it must not raise."""
    p = Presence()
    p.roll(WALL0, "UTC")
    p.apply("p-1", True, WALL0, "UTC")
    assert not p.roll(wall, "UTC") and not p.apply("p-2", True, wall, "UTC")
    assert p.inside() == ["p-1"]


def test_the_service_resets_presence_at_night_with_nobody_passing(tmp_path, services):
    """The idle hook rolls presence with the gate's clock (injected here: a day later), so
    the file a console reads says nobody is inside without waiting for the next passage."""
    import time

    from agent.core.acl import AccessList, build_table
    from tests.broker import wait_until
    from tests.test_service import acl_snapshot, drive_input, write_config

    svc = services(write_config(tmp_path, extra="state_save_s = 0.5\n"))
    table = build_table(AccessList.from_snapshot(acl_snapshot()), svc.gate._fp)
    svc.runtime.submit(ev.SwapTable(table=table, kind="snapshot", timezone="UTC"))
    wait_until(lambda: getattr(svc.gate.table, "version", "") == "t.1", what="the list applied")
    svc.runtime.submit(ev.CardRead(reader="entry", key=100 << 16 | 60179))
    wait_until(lambda: svc.gate.pending is not None, what="the grant")
    drive_input(svc, "pass_a", True)
    drive_input(svc, "pass_a", False)
    path = tmp_path / "state" / "presence.json"
    wait_until(lambda: path.exists() and json.loads(path.read_text())["people"].get("p-1", [0])[0] == 1,
               what="p-1 inside, saved")
    svc.runtime.clock._wall = lambda: time.time() + 86400  # the next day, past 03:00
    wait_until(lambda: json.loads(path.read_text())["people"] == {}, what="presence reset in the file")
    assert svc.gate.presence.inside() == []
