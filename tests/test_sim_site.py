"""The simulator's site scenarios (issue 14, item 4): several gates of one site, each its
own core Gate, records passed between them as the site's events are (agent/simsite.py,
docs/scenarios.md), a link that drops and comes back; the gate that made each record
beside it in the output and in the expectations.

On the main before this, every test here fails: the scenario schema knew no ``gates``,
``gate`` or ``link``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.simulator import (
    ScenarioError,
    Simulator,
    check_expectations,
    format_pretty,
    scenario_from_dict,
)

ROOT = Path(__file__).resolve().parent.parent
ACL = str(ROOT / "examples" / "acl" / "school.json")
SENIOR = "142,51091"  # p-0021
OTHER = "0006613800"  # p-0022
EXAMPLES = ROOT / "examples" / "scenarios"


def _site(steps, gates=({"name": "north"}, {"name": "south"}), expect=(), **extra):
    doc = {"start": "2026-09-01T07:30:00+07:00", "acl": ACL,
           "gate": {"site": "school-17", "readers": {"entry": "in", "exit": "out"}, "apb": "hard"},
           "gates": list(gates), "steps": steps, **extra}
    if expect:
        doc["expect"] = list(expect)
    return scenario_from_dict(doc, source="site.toml", base=ROOT)


def _run(sc, fp):
    sim = Simulator(sc, fp=fp)
    out = list(sim.run_gates())
    return sim, out


def _card(at, gate, card=SENIOR, reader="entry", **kw):
    return {"at": at, "gate": gate, "card": card, "reader": reader, **kw}


def _decisions(sim, gate=None):
    """(gate, type, person, reason) of every decision, in order."""
    return [(g, r["type"], r.get("person"), r.get("reason"))
            for r, g in zip(sim.records, sim.record_gates, strict=True)
            if r["type"].startswith("access.") and gate in (None, g)]


def test_a_passage_at_one_gate_refuses_the_same_pupil_at_the_other(fp):
    sim, out = _run(_site([_card("08:00", "north", walk=1.0), _card("08:01", "south")]), fp)
    assert _decisions(sim) == [("north", "access.granted", "p-0021", None),
                               ("south", "access.denied", "p-0021", "antipassback")]
    # Each gate its own journal: ids name it, seq counts its own records.
    assert [r["id"] for r in sim.records if r["type"] == "agent.started"] == ["north:1", "south:1"]
    assert {g for _n, g, _r in out} == {"north", "south"}
    # The records hold the contract's fields only: the gate and the step are beside them.
    assert all("step" not in r and r.get("gate") is None for r in sim.records)


def test_a_record_reaches_the_siblings_only_after_the_link_delay(fp):
    steps = [_card("08:00:00", "north", walk=1.0), _card("+1.5", "south")]  # 0.5 s after north's passage
    sim, _ = _run(_site(steps, link_delay_s=2.0), fp)
    assert _decisions(sim, "south") == [("south", "access.granted", "p-0021", None)]  # not heard of it yet
    sim, _ = _run(_site(steps, link_delay_s=0.2), fp)
    assert _decisions(sim, "south") == [("south", "access.denied", "p-0021", "antipassback")]


def test_a_grant_pending_at_one_gate_refuses_the_card_at_the_other_until_it_times_out(fp):
    steps = [_card("08:00:00", "north"), _card("+1", "south"), _card("+10", "south", walk=1.0)]
    sim, _ = _run(_site(steps), fp)
    assert _decisions(sim) == [("north", "access.granted", "p-0021", None),
                               ("south", "access.denied", "p-0021", "antipassback"),
                               ("south", "access.granted", "p-0021", None)]
    assert [(g, r["type"]) for r, g in zip(sim.records, sim.record_gates, strict=True)
            if r["type"].startswith("passage")] == [("north", "passage.timeout"), ("south", "passage")]


def test_each_gate_has_its_own_settings(fp):
    # Anti-passback only at north: south lets the pupil in again, north refuses.
    gates = [{"name": "north"}, {"name": "south", "apb": "off"}]
    steps = [_card("08:00", "north", walk=1.0), _card("08:01", "south", walk=1.0),
             _card("08:02", "north")]
    sim, _ = _run(_site(steps, gates=gates), fp)
    assert [d[1] for d in _decisions(sim)] == ["access.granted", "access.granted", "access.denied"]
    assert sim.gates["south"].gate._cfg.apb == "off" and sim.gates["north"].gate._cfg.gate == "north"


def test_a_gate_offline_decides_alone_and_reconciles_when_its_link_is_back(fp):
    steps = [{"at": "08:00", "gate": "north", "link": "down"},   # 1
             _card("08:01", "south", OTHER, walk=1.0),            # 2: in at south
             _card("08:02", "north", walk=1.0),                   # 3: in at north, alone
             _card("08:03", "south")]                             # 4: south has not heard of it
    alone, _ = _run(_site([*steps, _card("08:11", "north", OTHER)]), fp)
    # Never back: north grants the pupil who came in at south.
    assert _decisions(alone)[-2:] == [("south", "access.granted", "p-0021", None),
                                      ("north", "access.granted", "p-0022", None)]
    assert alone.gates["south"].gate.site.counts["passages"] == 0  # north's journal kept its records
    back, _ = _run(_site([*steps, {"at": "08:10", "gate": "north", "link": "up"},
                          _card("08:11", "north", OTHER), _card("08:12", "south")]), fp)
    assert _decisions(back)[-3:] == [("south", "access.granted", "p-0021", None),
                                     ("north", "access.denied", "p-0022", "antipassback"),
                                     ("south", "access.denied", "p-0021", "antipassback")]
    assert back.gates["south"].gate.site.counts["passages"] == 1


def test_records_held_while_the_link_is_down_come_in_their_order(fp):
    # The pupil goes in and out at south while north is offline: applied in order, north
    # knows them outside and lets them in; the other order would leave them inside (refused).
    steps = [{"at": "08:00", "gate": "north", "link": "down"},
             _card("08:01", "south", walk=1.0), _card("08:05", "south", reader="exit", walk=1.0),
             {"at": "08:10", "gate": "north", "link": "up"}, _card("08:11", "north", walk=1.0)]
    sim, _ = _run(_site(steps), fp)
    assert _decisions(sim, "north") == [("north", "access.granted", "p-0021", None)]
    assert sim.gates["north"].gate.site.counts["passages"] == 2
    # And the sibling's link: south offline, its records wait in its journal, then go in order.
    steps = [{"at": "08:00", "gate": "south", "link": "down"},
             _card("08:01", "south", walk=1.0), _card("08:05", "south", reader="exit", walk=1.0),
             {"at": "08:10", "gate": "south", "link": "up"}, _card("08:11", "north", walk=1.0)]
    sim, _ = _run(_site(steps), fp)
    assert _decisions(sim, "north") == [("north", "access.granted", "p-0021", None)]
    assert sim.gates["north"].gate.site.counts["passages"] == 2


def test_a_fire_at_one_gate_opens_the_roll_call_at_every_gate(fp):
    gates = [{"name": "north"}, {"name": "south"}, {"name": "east"}]
    steps = [_card("08:00", "north", walk=1.0), _card("08:01", "south", OTHER, walk=1.0),
             {"at": "10:00", "gate": "north", "fire": "open"},
             _card("+5", "north", reader="exit")]
    sim, _ = _run(_site(steps, gates=gates), fp)
    rollcalls = [(g, r["by"], r["gate"], r["inside"]) for r, g in zip(sim.records, sim.record_gates, strict=True)
                 if r["type"] == "rollcall"]
    assert rollcalls == [("north", "fire_loop", "north", ["p-0021", "p-0022"]),
                         ("south", "site", "north", ["p-0021", "p-0022"]),
                         ("east", "site", "north", ["p-0021", "p-0022"])]
    # The roll-call records are the fire step's; only north is freed.
    steps_of = {(g, r["type"]): n for r, g, n in zip(sim.records, sim.record_gates, sim.record_steps, strict=True)}
    assert steps_of[("south", "rollcall")] == steps_of[("east", "rollcall")] == 3
    assert [g for r, g in zip(sim.records, sim.record_gates, strict=True) if r["type"] == "mode.changed"] == ["north"]
    # The evacuee's read at north is noted as left at every gate.
    for name in ("north", "south", "east"):
        rc = sim.gates[name].gate.presence.rollcall
        assert set(rc.left) == {"p-0021"} and rc.not_seen_leaving() == ["p-0022"], name


def test_expectations_and_sequence_items_name_the_gate(fp):
    sim, _ = _run(_site([_card("08:00", "north", walk=1.0), _card("08:01", "south")]), fp)
    args = (None, sim.record_steps, sim.record_gates)
    ok = [{"type": "passage", "gate": "north", "count": 1}, {"type": "passage", "gate": "south", "count": 0},
          {"sequence": [{"type": "passage", "gate": "north"}, {"type": "access.denied", "gate": "south", "step": 2}]}]
    assert check_expectations(sim.records, ok, *args) == []
    bad = [{"type": "access.denied", "gate": "north"},
           {"sequence": [{"type": "access.denied", "gate": "south"}, {"type": "passage", "gate": "north"}]}]
    failures = check_expectations(sim.records, bad, *args)
    assert failures[0] == "expect 1: {'type': 'access.denied', 'gate': 'north'} matched 0 record(s), expected at least 1"
    assert failures[1].startswith("expect 2: sequence out of order: item 2 {'type': 'passage', 'gate': 'north'}")


def test_a_scenario_without_gates_is_one_gate_as_before(fp):
    sc = scenario_from_dict({"start": "2026-09-01T07:30:00+07:00", "acl": ACL,
                             "gate": {"readers": {"entry": "in"}, "gate": "main"},
                             "steps": [{"at": "08:00", "card": SENIOR}],
                             "expect": [{"type": "access.granted", "gate": "main"}]}, base=ROOT)
    sim = Simulator(sc, fp=fp)
    assert type(sim) is Simulator and not sc.gates
    recs = list(sim.run())
    assert [r["id"] for r in recs][:2] == ["sim:1", "sim:2"]
    assert set(sim.record_gates) == {"main"}
    assert check_expectations(sim.records, sc.expect, None, sim.record_steps, sim.record_gates) == []


def test_bad_site_scenarios_are_refused_with_where():
    with pytest.raises(ScenarioError) as info:
        _site([_card("08:00", "west"),
               {"at": "08:01", "gate": "north", "link": "down", "card": SENIOR},
               {"at": "08:02", "gate": "north", "link": "sideways"}],
              gates=[{"name": "north"}, {"name": "north"}, {"name": "south", "apb": "maybe", "colour": "red"},
                     {"name": "east", "gate": "x"}, {"name": "a/b"}],
              expect=[{"type": "passage", "gate": "west"}])
    text = "\n".join(info.value.problems)
    assert "/gates/1/name: 'north' is declared twice; each gate once" in text
    assert "/gates/2/colour: unknown setting; allowed: name, " in text
    assert "/gates/2: invalid gate config" in text  # apb = "maybe"
    assert "/gates/3/gate: a gate of [[gates]] is named by `name`" in text
    assert "/gates/4/name" in text  # not a topic level: the schema's pattern
    assert "step 1, gate: 'west' is not a gate of [[gates]]: ['north', 'south', 'east']" in text
    assert "step 2, link: a link change goes on a step of its own" in text
    assert "step 3, link" in text
    assert "expect 1, gate: 'west' is not a gate of the scenario" in text
    with pytest.raises(ScenarioError) as info:  # gate and link need [[gates]]
        scenario_from_dict({"start": "2026-09-01T07:30:00+07:00", "acl": ACL,
                            "steps": [{"at": "08:00", "gate": "north", "card": SENIOR},
                                      {"at": "08:01", "link": "down"}]}, base=ROOT)
    text = "\n".join(info.value.problems)
    assert "step 1, gate: gate is for a scenario with several gates; declare them with [[gates]]" in text
    assert "step 2, link: link is for a scenario with several gates" in text


def test_a_step_with_no_gate_is_the_first_gates(fp):
    sim, _ = _run(_site([{"at": "08:00", "card": SENIOR, "reader": "entry"}]), fp)
    assert _decisions(sim) == [("north", "access.granted", "p-0021", None)]


def test_the_cli_says_which_gate_made_each_record(tmp_path):
    path = EXAMPLES / "site-antipassback.toml"
    cmd = [sys.executable, "-m", "agent.cli", "simulate"]
    env = {**os.environ, "LANGUAGE": "en"}
    res = subprocess.run([*cmd, "--steps", str(path)], check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [set(d) for d in lines] == [{"step", "gate", "record"}] * len(lines)
    assert (2, "south", "access.denied") in [(d["step"], d["gate"], d["record"]["type"]) for d in lines]
    res = subprocess.run([*cmd, "--check", "--pretty", str(path)], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith("08:01:00.000 [2]   south    #2    access.denied") for line in res.stdout.splitlines()), \
        res.stdout
    # Plain JSON Lines: the records as they are; their ids name the gate's journal.
    res = subprocess.run([*cmd, str(path)], check=False, capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env=env)
    assert {json.loads(line)["id"].split(":")[0] for line in res.stdout.splitlines()} == {"north", "south"}


def test_an_unknown_gate_is_told_in_russian(tmp_path):
    sc = tmp_path / "site.toml"
    sc.write_text(f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n[[gates]]\nname = "north"\n'
                  '[[steps]]\nat = "08:00"\ngate = "west"\ncard = "142,51091"\n')
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", str(sc)], check=False,
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "LANGUAGE": "ru", "LANG": "ru_RU.UTF-8"})
    assert res.returncode == 2
    assert "в [[gates]] нет турникета 'west': ['north']" in res.stderr, res.stderr


def test_pretty_lines_show_the_gate_in_a_column():
    rec = {"ts": "2026-09-01T01:00:00.000Z", "seq": 12, "type": "passage", "direction": "in"}
    assert format_pretty(rec, step=3, gate="north").startswith("01:00:00.000 [3]   north    #12   passage")


@pytest.mark.parametrize("name", ["site-antipassback.toml", "site-offline.toml", "site-fire-drill.toml"])
def test_site_examples_have_several_gates_and_check_order_by_gate(name):
    from agent.simulator import load_scenario

    sc = load_scenario(EXAMPLES / name)
    assert len(sc.gates) >= 2
    assert any("sequence" in e and any("gate" in item for item in e["sequence"]) for e in sc.expect)


def test_a_rush_a_held_card_and_a_serial_frame_happen_at_their_gate(fp):
    frame = b"\x0214008EC793CE\x03".hex(" ")  # the RDM6300 frame of SENIOR
    steps = [{"at": "08:00", "gate": "south", "rush": {"cards": ["100,60179", "100,60181"], "every": 3.0,
                                                       "walk": 1.0}},
             {"at": "08:01", "gate": "south", "serial": frame, "protocol": "rdm6300", "reader": "entry",
              "hold": {"for": 1.2, "every": 0.25}, "walk": 1.0},
             {"at": "08:02", "gate": "north", "serial": frame[:12], "protocol": "rdm6300", "reader": "entry"}]
    sim, _ = _run(_site(steps), fp)
    made = [(g, r["type"], r.get("person"), r.get("kind")) for r, g in zip(sim.records, sim.record_gates, strict=True)
            if r["type"] in ("access.granted", "reader.error")]
    # The held card is one grant (the repeat filter of south's reader); the torn frame is north's.
    assert made == [("south", "access.granted", "p-0001", None), ("south", "access.granted", "p-0003", None),
                    ("south", "access.granted", "p-0021", None), ("north", "reader.error", None, "garbage")]
