"""Gates of a site share passages and grants (agent/core/site.py, docs/site.md):
the core's side, on both twins. The MQTT side is in tests/test_site_gates.py."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.core import events as ev
from agent.core.site import SEEN_MAX, SiteView
from fastpath import codes
from tests.test_turnstile import ALICE, GUEST, K_ALICE, K_GUEST, WALL0, card, columns, make, only

pytestmark = pytest.mark.core

_n = [0]


def rec(rtype: str, t: float, *, person: str | None = ALICE, direction: str = "in",
        source: str | None = "card", rid: str | None = None, **extra) -> dict:
    """A sibling's record as its events topic carries it (t: seconds after WALL0)."""
    _n[0] += 1
    ts = datetime.fromtimestamp(WALL0 + t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    out = {"v": 1, "id": rid or f"sib:{_n[0]}", "seq": _n[0], "ts": ts, "clock_synced": True,
           "boot": "b-2", "mono": 5.0 + t, "type": rtype, "direction": direction, "person": person,
           **extra}
    if rtype == "access.granted":
        out.update(reader="entry", card=K_ALICE, format="w26")
    else:
        out.update(source=source, card=K_ALICE if source == "card" else None)
    return out


def sibling(r: dict, gate: str = "north") -> ev.SiblingRecord:
    return ev.SiblingRecord(gate, r)


def decided(step: ev.Step) -> tuple[str, dict]:
    [r] = [r for r in step.records if r["type"] in ("access.granted", "access.denied")]
    return r["type"], r


def test_a_passage_at_a_sibling_moves_the_person_here(fp):
    run = make(fp, apb="hard")
    step = run(1, sibling(rec("passage", 1, direction="in")))
    assert step.records == [] and step.commands == []  # the sibling's record, not this gate's
    kind, r = decided(run(2, card(K_ALICE)))
    assert (kind, r["reason"]) == ("access.denied", "antipassback")  # already inside
    kind, _ = decided(run(3, card(K_ALICE, reader="exit")))
    assert kind == "access.granted"  # and may leave


def test_a_grant_in_force_at_a_sibling_refuses_the_same_card_here_until_it_ends(fp):
    run = make(fp, apb="hard", wait_s=5.0)
    run(1, sibling(rec("access.granted", 1)))
    kind, r = decided(run(1.5, card(K_ALICE)))
    assert (kind, r["reason"]) == ("access.denied", "antipassback")
    assert run.gate.site.grants == {ALICE: "north"}
    # Nobody passed at the sibling: its timeout ends the grant, and the card works here.
    run(6, sibling(rec("passage.timeout", 6, waited_ms=5000)))
    kind, _ = decided(run(6.5, card(K_ALICE)))
    assert kind == "access.granted"


def test_a_sibling_grant_whose_end_never_comes_runs_out_after_the_wait(fp):
    run = make(fp, apb="hard", wait_s=5.0)
    run(1, sibling(rec("access.granted", 1)))
    assert decided(run(5.9, card(K_ALICE)))[1]["reason"] == "antipassback"  # within 5 + 1 s
    kind, _ = decided(run(7.1, card(K_ALICE)))  # past it: the sibling went quiet mid-wait
    assert kind == "access.granted"


def test_soft_anti_passback_grants_with_the_warning_and_off_ignores_siblings(fp):
    soft = make(fp, apb="soft")
    soft(1, sibling(rec("access.granted", 1)))
    kind, r = decided(soft(2, card(K_ALICE)))
    assert kind == "access.granted" and r["warning"] == "antipassback"
    off = make(fp, apb="off")
    off(1, sibling(rec("access.granted", 1)))
    off(1, sibling(rec("passage", 1)))
    kind, r = decided(off(2, card(K_ALICE)))
    assert kind == "access.granted" and "warning" not in r


def test_timed_anti_passback_counts_an_entry_at_a_sibling(fp):
    run = make(fp, apb="timed", apb_window_min=1)
    run(1, sibling(rec("passage", 1)))
    assert decided(run(30, card(K_ALICE)))[1]["reason"] == "antipassback"
    assert decided(run(62, card(K_ALICE)))[0] == "access.granted"


def test_a_record_delivered_twice_is_taken_once(fp):
    """A guest's entry at a sibling spends one use, however often the broker delivers it."""
    run = make(fp, table=columns(guest_uses=2), apb="off")
    entry = rec("passage", 1, person=GUEST, rid="north-journal:7")
    for t in (1, 2, 3):
        run(t, sibling(entry))
    assert run.gate.site.counts["duplicate"] == 2
    assert run.gate.state.uses(GUEST) == 1
    assert decided(run(4, card(K_GUEST)))[0] == "access.granted"  # the second of two uses


def test_the_later_movement_wins_by_its_time(fp):
    """The order rule: A's own exit at t=10 and a sibling's entry stamped t=5 that
    arrives after it: the person is outside (the entry is older)."""
    run = make(fp, apb="hard")
    run(9, card(K_ALICE, reader="exit"))
    run(10, ev.PassSensor("B"))  # own passage out, at t=10
    run(11, sibling(rec("passage", 5, direction="in")))
    assert run.gate.site.counts["stale"] == 1
    assert decided(run(12, card(K_ALICE)))[0] == "access.granted"  # still outside: may enter
    # A later sibling movement does apply.
    run(13, sibling(rec("passage", 12.5, direction="out")))
    run(14, sibling(rec("passage", 13.5, direction="in")))
    assert decided(run(15, card(K_ALICE)))[1]["reason"] == "antipassback"


@pytest.mark.parametrize("junk", [
    None, "text", [], {}, {"id": 5}, {"id": "x:1"},
    {"id": "x:2", "type": "passage", "person": ALICE, "source": "card", "direction": "up", "ts": "t"},
    {"id": "x:3", "type": "passage", "person": ALICE, "source": "card", "direction": "in", "ts": "no"},
    {"id": "x:4", "type": "passage", "person": "has space\n" * 20, "source": "card",
     "direction": "in", "ts": "2026-09-07T08:00:01Z"},
    {"id": "x:5", "type": "passage", "person": ALICE, "source": "card", "direction": "in",
     "ts": "9999-12-31T23:59:59Z"},
    {"id": "x:6", "type": "access.granted", "person": 17},
])
def test_junk_from_a_sibling_is_counted_and_never_faults_the_gate(fp, junk):
    run = make(fp, apb="hard")
    step = run(1, ev.SiblingRecord("north", junk))
    assert step.records == [] and not run.gate.faulted
    step = run(1, ev.SiblingRecord("", rec("passage", 1)))  # no gate name
    assert step.records == [] and not run.gate.faulted
    kind, _ = decided(run(2, card(K_ALICE)))
    assert kind == "access.granted"


def test_fire_mode_records_and_manual_opens_at_a_sibling_hold_nobody():
    view = SiteView(wait_s=5)
    assert view.take("north", rec("access.granted", 1, check="none"), 0.0) is None
    assert view.take("north", {**rec("passage", 1, source="button"), "person": None}, 0.0) is None
    assert view.grants == {}


def test_the_ids_remembered_are_bounded():
    view = SiteView(wait_s=5)
    for i in range(SEEN_MAX + 10):
        assert view.admit({"id": f"n:{i}", "type": "telemetry"})
    assert len(view._seen) == SEEN_MAX
    assert not view.admit({"id": f"n:{SEEN_MAX + 9}"})  # a recent one: a repeat
    assert view.admit({"id": "n:0", "type": "x"})  # the oldest was forgotten: let in again
    assert view.counts["duplicate"] == 1


def test_own_grants_are_not_blocked_by_the_gates_own_records(fp):
    """A gate never takes its own records as a sibling's (the adapter drops its own
    topic); a grant here is decided by this gate's own rules alone."""
    run = make(fp, apb="hard")
    kind, _ = decided(run(1, card(K_ALICE)))
    assert kind == "access.granted"
    assert only(run(2, ev.PassSensor("A")), "passage")["person"] == ALICE
    assert run.gate.site.grants == {}
    assert codes.APB_MODES[codes.APB_HARD] == "hard"


def test_after_a_fire_drill_hard_anti_passback_lets_everybody_back_in(fp):
    """Pupils evacuated through a free turnstile mostly touch no reader: at the fire
    reset their positions (and timed anti-passback's last entries) are forgotten, so
    nobody is refused coming back in; a guest's spent use stays spent."""
    run = make(fp, table=columns(guest_uses=2), apb="hard")
    for key, t in ((K_ALICE, 1), (K_GUEST, 3)):
        run(t, card(key))
        run(t + 0.5, ev.PassSensor("A"))
    assert decided(run(5, card(K_ALICE)))[1]["reason"] == "antipassback"  # inside
    run(6, ev.FireLoop(open=True))
    run(60, ev.FireLoop(open=False))
    run(61, ev.FireReset(by="input"))
    assert not run.gate.fire_latched
    assert decided(run(62, card(K_ALICE)))[0] == "access.granted"
    assert run.gate.state.uses(GUEST) == 1
    assert run.gate.state.to_dict()["positions"] == {}


def test_a_passage_stamped_ahead_of_this_gates_clock_is_not_applied(fp):
    """A sibling whose clock runs a day fast must not pin a pupil 'inside' until tomorrow
    (its passage would win over every real one by the order rule)."""
    run = make(fp, apb="hard")
    run(1, sibling(rec("passage", 86400, direction="in")))  # stamped a day ahead
    assert run.gate.site.counts["future"] == 1
    assert decided(run(2, card(K_ALICE)))[0] == "access.granted"
    run(2.5, ev.PassSensor("A"))
    run(3, sibling(rec("passage", 3, direction="out")))  # a real one still applies
    assert decided(run(4, card(K_ALICE)))[0] == "access.granted"


# --- found in review: the roll-call, restarts, ties, clocks -------------------------------------

def _alarm(t: float, rid: str) -> dict:
    a = rec("alarm.fire", t, active=True, rid=rid)
    a.pop("person", None)
    return a


def _reset(t: float, rid: str) -> dict:
    return {"id": rid, "type": "mode.changed", "from": "fire", "to": "normal", "by": "fire_reset",
            "ts": rec("passage", t)["ts"]}


def test_a_repeat_of_a_siblings_alarm_after_its_reset_opens_nothing(fp):
    """The sibling resends its records while no ingest ack comes: the same alarm again must
    not open a new roll-call over the finished one (nor journal another rollcall)."""
    run = make(fp, apb="hard", gate="south")
    run(1, card(K_ALICE))
    run(1.5, ev.PassSensor("A"))
    run(10, sibling(_alarm(10, "north:100")))
    assert run.gate.presence.rollcall.active
    run(20, sibling(rec("access.granted", 20, direction="out", check="none", rid="north:101")))
    run(100, sibling(_reset(100, "north:102")))
    assert not run.gate.presence.rollcall.active
    n = len(run.records)
    run(130, sibling(_alarm(10, "north:100")))  # the same record again
    run(131, sibling({**_alarm(10, "north:100"), "id": "north-new-journal:5"}))  # a copy, new id
    run(132)
    rc = run.gate.presence.rollcall
    assert not rc.active and ALICE in rc.left
    assert [r for r in run.records[n:] if r["type"] == "rollcall"] == []


def test_a_siblings_fire_reset_frees_the_positions_here_too(fp):
    run = make(fp, apb="hard", gate="south")
    run(1, card(K_ALICE))
    run(1.5, ev.PassSensor("A"))
    run(10, sibling(_alarm(10, "north:200")))
    run(100, sibling(_reset(100, "north:201")))
    assert decided(run(110, card(K_ALICE)))[0] == "access.granted"  # came back in after the drill


def test_a_roll_call_a_sibling_opened_ends_at_this_gates_reset_and_yields_to_its_own_alarm(fp):
    """The sibling may never send its reset (it lost power in the fire): this gate's reset
    input ends the roll-call, and this gate's own next alarm gets a roll-call of its own."""
    run = make(fp, apb="hard", gate="south")
    run(10, sibling(_alarm(10, "north:300")))
    assert run.gate.presence.rollcall.by == "site"
    run(100, ev.FireReset(by="input"))
    assert not run.gate.presence.rollcall.active
    # Another sibling alarm left open, then this gate's own loop opens: its own roll-call.
    run(200, sibling(_alarm(200, "north:301")))
    assert run.gate.presence.rollcall.active and run.gate.presence.rollcall.by == "site"
    n = len(run.records)
    run(300, ev.FireLoop(open=True))
    run(300.1)
    rc = run.gate.presence.rollcall
    assert rc.active and rc.by == "fire_loop" and rc.started == WALL0 + 300
    assert [r["by"] for r in run.records[n:] if r["type"] == "rollcall"] == ["fire_loop"]


def test_after_a_restart_a_resent_older_sibling_passage_does_not_undo_a_later_one_here(fp):
    from agent.core.gateconfig import GateConfig
    from agent.core.presence import Presence
    from agent.core.turnstile import Gate
    from tests.test_turnstile import Run

    run = make(fp, apb="hard", gate="south")
    a_in = rec("passage", 1, direction="in", rid="north-j:1")  # in at north
    run(1, sibling(a_in))
    run(100, card(K_ALICE, reader="exit"))
    run(100.5, ev.PassSensor("B"))  # out here, later
    # A restart: state and presence as their files keep them; the order rule's memory is gone.
    state = fp.GateState.from_dict(run.gate.state.to_dict())
    presence = Presence.from_dict(run.gate.presence.to_dict())
    gate = Gate(GateConfig(apb="hard", gate="south"), fp, fp.Table(columns()), state, boot="b-2",
                implementation="pure", presence=presence)
    run2 = Run(gate)
    run2.start(120)
    run2(130, sibling(a_in))  # north's journal resends it
    assert gate.site.counts["stale"] == 1
    assert decided(run2(140, card(K_ALICE)))[0] == "access.granted"  # outside: may come in


def test_a_guest_passage_resent_after_its_id_was_forgotten_spends_no_second_use(fp):
    run = make(fp, table=columns(guest_uses=2), apb="off", gate="south")
    entry = rec("passage", 1, person=GUEST, rid="north-journal:7")
    run(1, sibling(entry))
    for i in range(SEEN_MAX + 1):
        run(2, sibling({"id": f"north-journal:{1000 + i}", "type": "turnstile.ready", "ts": entry["ts"]}))
    run(3, sibling(entry))
    assert run.gate.state.uses(GUEST) == 1
    assert decided(run(4, card(K_GUEST)))[0] == "access.granted"


def test_a_sibling_passage_from_the_future_moves_nobody_in_presence_either(fp):
    run = make(fp, apb="hard", gate="south")
    run(1, sibling(rec("passage", 3600, direction="in", rid="north:9")))  # an hour ahead
    assert run.gate.presence.inside() == []


def test_an_unsynchronised_clock_neither_outranks_siblings_nor_judges_them(fp):
    """This gate's clock a day ahead and not synchronised: its own passage must not make
    every later sibling passage stale; with it a day behind, a sibling's real passage
    must not be dropped as from the future."""
    run = make(fp, apb="hard", gate="south")
    run.gate.handle(card(K_ALICE, reader="exit"), ev.Now(mono=1002.0, wall=WALL0 + 86400, synced=False))
    run.gate.handle(ev.PassSensor("B"), ev.Now(mono=1002.5, wall=WALL0 + 86400, synced=False))
    run(5, sibling(rec("passage", 4, direction="in", rid="north:20")))
    assert run.gate.site.counts["stale"] == 0 and run.gate.site.counts["passages"] == 1
    behind = make(fp, apb="hard", gate="south")
    behind.gate.handle(sibling(rec("passage", 4, direction="in", rid="north:21")),
                       ev.Now(mono=1005.0, wall=WALL0 - 86400, synced=False))
    assert behind.gate.site.counts["future"] == 0 and behind.gate.site.counts["passages"] == 1


def test_a_grant_from_a_backlog_holds_nobody(fp):
    run = make(fp, apb="hard", gate="south")
    run(3600, sibling(rec("access.granted", 1, rid="north:30")))  # an hour old when it comes
    assert run.gate.site.grants == {}
    assert decided(run(3601, card(K_ALICE)))[0] == "access.granted"
