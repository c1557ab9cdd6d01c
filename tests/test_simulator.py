"""The simulator: every example scenario meets its expectations on both twins,
bad scenarios are refused with where, and runs are deterministic."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.simulator import (
    ScenarioError,
    Simulator,
    check_expectations,
    load_scenario,
    scenario_from_dict,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "scenarios").glob("*.toml"))
ACL = str(ROOT / "examples" / "acl" / "school.json")


def run(scenario, fp, trace_io=False):
    return list(Simulator(scenario, fp=fp, trace_io=trace_io).run())


def test_there_are_at_least_ten_example_scenarios():
    assert len(EXAMPLES) >= 10, [p.name for p in EXAMPLES]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_scenario_meets_its_expectations(path, fp):
    scenario = load_scenario(path)
    assert scenario.expect, f"{path.name} has no [[expect]] entries"
    sim = Simulator(scenario, fp=fp)
    out = list(sim.run())
    # The step numbers beside the records: entries may name the step, sequences check order.
    # A site scenario's entries may name the gate that made the record.
    failures = check_expectations(out, scenario.expect, scenario.expect_lines, sim.record_steps,
                                  sim.record_gates)
    assert not failures, "\n".join(failures)
    # Records are numbered gap-free in order, ids are {journal}:{seq}: one journal "sim", or
    # each gate of a site its own, named after it.
    journals = [g.name for g in scenario.gates] or [None]
    for journal in journals:
        mine = [r for r, g in zip(out, sim.record_gates, strict=True) if journal in (None, g)]
        assert [r["seq"] for r in mine] == list(range(1, len(mine) + 1))
        assert all(r["id"] == f"{journal or 'sim'}:{r['seq']}" for r in mine)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_records_follow_the_contract(path, fp):
    contract = pytest.importorskip("agent.contract")
    for rec in run(load_scenario(path), fp):
        errors = contract.validate("event", rec)
        assert not errors, (rec, errors)


def test_same_scenario_gives_same_records_on_both_twins(fp_pair):
    pure, compiled = fp_pair
    path = ROOT / "examples" / "scenarios" / "school-morning.toml"
    a, b = run(load_scenario(path), pure), run(load_scenario(path), compiled)
    # agent.started names the twin that ran; everything else is identical.
    assert a[0]["fastpath"] == "pure" and b[0]["fastpath"] == "compiled"
    a[0].pop("fastpath"), b[0].pop("fastpath")
    assert a == b


def test_run_is_deterministic(fp):
    path = ROOT / "examples" / "scenarios" / "school-morning.toml"
    assert run(load_scenario(path), fp) == run(load_scenario(path), fp)


def _mini(steps, **extra):
    doc = {
        "start": "2026-09-01T07:30:00+07:00",
        "acl": ACL,
        "gate": {"readers": {"entry": "in", "exit": "out"}},
        "steps": steps,
    }
    doc.update(extra)
    return scenario_from_dict(doc, source="mini.toml", base=ROOT)


def test_card_string_and_raw_wiegand_and_rdm6300_give_one_key(fp):
    from agent.core.cards import encode_rdm6300, encode_w26

    w26 = encode_w26(100, 60179)
    tag = (0x14 << 32) | (100 << 16) | 60179
    serial = encode_rdm6300(tag).hex(" ")
    sc = _mini([
        {"at": "08:00:00", "card": "100,60179", "reader": "entry"},
        {"at": "+10", "wiegand": w26, "reader": "entry"},
        {"at": "+10", "serial": serial, "protocol": "rdm6300", "reader": "entry"},
    ])
    decisions = [r for r in run(sc, fp) if r["type"].startswith("access.")]
    assert len(decisions) == 3
    assert len({r["card"] for r in decisions}) == 1
    assert decisions[0]["card"] == (100 << 16) | 60179


def test_walk_turns_a_grant_into_a_passage(fp):
    sc = _mini([{"at": "08:00:00", "card": "100,60179", "reader": "entry", "walk": 1.5}])
    out = run(sc, fp)
    types = [r["type"] for r in out]
    assert "access.granted" in types and "passage" in types
    passage = next(r for r in out if r["type"] == "passage")
    assert passage["direction"] == "in" and passage["source"] == "card"


def test_trace_io_shows_every_output_change(fp):
    sc = _mini([{"at": "08:00:00", "card": "100,60179", "reader": "entry", "walk": 1.0}])
    out = run(sc, fp, trace_io=True)
    io = [(o["line"], o["active"]) for o in out if o.get("trace") == "io"]
    assert ("unlock_a", True) in io
    assert ("unlock_a", False) in io
    opened = io.index(("unlock_a", True))
    assert ("unlock_a", False) in io[opened:], "the unlock line must be released after the pulse"
    # Nothing is active at start: the first trace of every line is "off".
    first = {}
    for line, active in io:
        first.setdefault(line, active)
    assert first["stop"] is False and first["fire_release"] is False


def test_bad_frame_is_a_reader_error_not_a_decision(fp):
    from agent.core.cards import encode_w26

    bits = list(encode_w26(100, 60179))
    bits[5] = "1" if bits[5] == "0" else "0"  # break the even parity
    sc = _mini([{"at": "08:00:00", "wiegand": "".join(bits), "reader": "entry"}])
    out = run(sc, fp)
    assert [r["kind"] for r in out if r["type"] == "reader.error"] == ["parity"]
    assert not [r for r in out if r["type"].startswith("access.")]


def test_invalid_scenario_lists_every_problem_with_where():
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict(
            {
                "start": "2026-09-01T07:30:00+07:00",
                "acl": ACL,
                "gate": {"readers": {"entry": "in"}, "pulse_s": 0.01, "colour": "red"},
                "steps": [
                    {"at": "08:00", "card": "100;60179", "reader": "entry"},
                    {"at": "08:01", "card": "100,60179", "reader": "side-door"},
                    {"at": "07:59", "pass": "A"},
                ],
            },
            source="bad.toml",
            base=ROOT,
        )
    msg = str(info.value)
    assert "bad.toml" in msg
    assert "step 1, card" in msg
    assert "step 2, reader" in msg
    assert "step 3, at" in msg
    assert "/gate/colour" in msg
    assert "pulse_s" in msg


def test_schema_errors_name_the_path():
    with pytest.raises(ScenarioError) as info:
        scenario_from_dict({"start": "2026-09-01T07:30:00+07:00", "steps": [{"at": "8 o'clock", "pass": "C"}]})
    msg = str(info.value)
    assert "step 1, at" in msg and "step 1, pass" in msg


def test_cli_prints_json_lines_and_exits_2_on_a_bad_file(tmp_path):
    good = ROOT / "examples" / "scenarios" / "school-morning.toml"
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", str(good)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines and all({"id", "seq", "ts", "type", "v"} <= set(rec) for rec in lines)
    assert lines[0]["type"] == "agent.started"
    bad = tmp_path / "bad.toml"
    bad.write_text('start = "yesterday"\nsteps = []\n')
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", str(bad)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 2
    assert "bad.toml" in res.stderr and "/steps" in res.stderr


def test_cli_check_fails_on_an_unmet_expectation(tmp_path):
    sc = tmp_path / "x.toml"
    sc.write_text(
        f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n'
        '[[steps]]\nat = "08:00"\ncard = "100,60179"\nreader = "entry"\n'
        '[[expect]]\ntype = "access.denied"\nreason = "blocked"\n'
    )
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", "--check", str(sc)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 1
    assert "expectation not met: expect 1 (line 7):" in res.stderr


def test_cli_check_says_so_when_every_expectation_is_met(tmp_path):
    sc = tmp_path / "x.toml"
    sc.write_text(
        f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n'
        '[[steps]]\nat = "08:00"\ncard = "100,60179"\nreader = "entry"\n'
        '[[expect]]\ntype = "agent.started"\n'
        '[[expect]]\ntype = "agent.started"\ncount = 1\n'
    )
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", "--check", str(sc)],
                         check=False, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "expectations met: 2" in res.stderr


def test_a_schema_error_does_not_hide_the_others_and_each_step_is_named_by_number_and_line(tmp_path):
    sc = tmp_path / "bad.toml"
    sc.write_text(
        f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n'   # 1-2
        '[gate]\nreaders = { entry = "in" }\ncolour = "red"\n'  # 3-5
        '\n[[steps]]\nat = "08:00"\ncard = "100;60179"\nreader = "entry"\n'  # 6-10: card on 9
        '\n[[steps]]  # a comment\nat = "8 o\'clock"\npass = "C"\n'  # 11-14: header on 12
        '\n[[steps]]\nat = "08:01"\nreader = "side-door"\ncard = "100,60179"\n'  # 15-19: reader on 18
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(sc)
    problems = info.value.problems
    text = "\n".join(problems)
    # The schema's errors (step 2) and the meaning's (steps 1 and 3, the gate) together.
    assert any(p.startswith("step 2 (line 13), at:") for p in problems), text
    assert any(p.startswith("step 2 (line 14), pass:") for p in problems), text
    assert any(p.startswith("step 1 (line 9), card:") for p in problems), text
    assert any(p.startswith("step 3 (line 18), reader:") for p in problems), text
    assert any("/gate/colour" in p for p in problems), text
    assert "/steps/" not in text
