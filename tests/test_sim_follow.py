"""The simulator follows the service (issue 14, item 4): serial steps through the
serial adapter's repeat filter and quiet-line flush, an OSDP card stimulus that
becomes what the OSDP adapter makes of libosdp's event, the number of the step
behind every record, and ordered expectations (`sequence`).

The adapter cross-checks run the real adapters: SerialReader on a pty with its
clock set to each frame's virtual time, OsdpBus's libosdp event callback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.core import events as ev
from agent.core.cards import encode_rdm6300, encode_w26, parse_card_string
from agent.simulator import (
    MONO_START,
    ScenarioError,
    Simulator,
    check_expectations,
    format_pretty,
    load_scenario,
    scenario_from_dict,
)
from tests.submitted import Events

ROOT = Path(__file__).resolve().parent.parent
ACL = str(ROOT / "examples" / "acl" / "school.json")
SENIOR = "142,51091"  # p-0021, any time of the school day; printed 0009357203
SENIOR_KEY = parse_card_string(SENIOR)
JUNIOR_KEY = parse_card_string("100,60179")  # p-0001
FRAME = b"\x0214008EC793CE\x03"  # the RDM6300 frame of SENIOR
JUNIOR_FRAME = encode_rdm6300((0x14 << 32) | JUNIOR_KEY)


def _scenario(steps, expect=(), **extra):
    doc = {"start": "2026-09-01T07:30:00+07:00", "acl": ACL,
           "gate": {"readers": {"entry": "in", "exit": "out"}}, "steps": steps, **extra}
    if expect:
        doc["expect"] = list(expect)
    return scenario_from_dict(doc, source="mini.toml", base=ROOT)


def _run(sc, fp):
    sim = Simulator(sc, fp=fp)
    out = list(sim.run_steps())
    return sim, out


def _records(sc, fp):
    """The records only, by run() (what main's simulator has too: these tests show the change)."""
    return [r for r in Simulator(sc, fp=fp).run() if "type" in r]


def _serial(at, frame=FRAME, **kw):
    return {"at": at, "serial": frame.hex(" "), "protocol": "rdm6300", "reader": "entry", **kw}


def _decisions(records):
    return [(r["type"], r.get("reason")) for r in records if r["type"].startswith("access.")]


# -- the serial repeat filter ----------------------------------------------------------------


def test_a_card_held_1_2_s_is_one_grant_as_in_the_service(fp):
    """Issue 14: frames every 0.4 s for 1.2 s, the pupil passing after 1 s, gave two
    gate_busy refusals and a second grant in the simulator; the service gives one grant."""
    sc = _scenario([_serial("08:00:00", walk=1.0), _serial("+0.4"), _serial("+0.4"), _serial("+0.4")])
    records = _records(sc, fp)
    assert _decisions(records) == [("access.granted", None)]
    assert [r["type"] for r in records].count("passage") == 1
    assert "passage.timeout" not in [r["type"] for r in records]


def test_hold_repeats_the_frame_and_the_filter_makes_it_one_read(fp):
    held = _scenario([_serial("08:00:00", hold={"for": 10, "every": 0.25})])
    records = _records(held, fp)
    # Left on the reader 10 s: one grant, which times out; the frames after it stay repeats.
    assert _decisions(records) == [("access.granted", None)]
    assert [r["type"] for r in records].count("passage.timeout") == 1
    # The 41 frames are there: with a window below their spacing each one is a read.
    fast = _scenario([_serial("08:00:00", hold={"for": 10, "every": 0.25})], repeat_window_s=0.2)
    records = _records(fast, fp)
    assert len(_decisions(records)) == 41


def test_the_window_is_the_scenarios_and_another_card_or_a_pause_is_a_new_read(fp):
    steps = [_serial("08:00:00"), _serial("+0.5", JUNIOR_FRAME), _serial("+0.5"), _serial("+2.5")]
    records = _records(_scenario(steps, gate={"readers": {"entry": "in"}, "wait_s": 1.0}), fp)
    # 0.0 senior, 0.5 junior (another key), 1.0 senior again (a repeat), 3.5 senior (window passed).
    assert [r["card"] for r in records if r["type"].startswith("access.")] == \
        [SENIOR_KEY, JUNIOR_KEY, SENIOR_KEY]
    records = _records(_scenario(steps, gate={"readers": {"entry": "in"}, "wait_s": 1.0}, repeat_window_s=3.0), fp)
    assert [r["card"] for r in records if r["type"].startswith("access.")] == [SENIOR_KEY, JUNIOR_KEY]


def test_a_frame_torn_by_a_pause_is_garbage_as_the_serial_reader_reports_it(fp):
    half = len(FRAME) // 2
    torn = [_serial("08:00:00", FRAME[:half]), _serial("+0.5", FRAME[half:])]
    records = _records(_scenario(torn), fp)
    assert [r.get("kind") for r in records if r["type"] == "reader.error"] == ["garbage", "garbage"]
    assert not _decisions(records)
    # Within the reader's read timeout the halves are one frame.
    records = _records(_scenario([torn[0], _serial("+0.05", FRAME[half:])]), fp)
    assert _decisions(records) == [("access.granted", None)]


def test_the_simulator_and_the_serial_reader_pass_the_same_reads(fp, pty_pair):
    """The same timed frames through the real SerialReader (its clock at each frame's
    virtual time) and through the simulator: the same cards reach the gate."""
    from agent.hw.serial_reader import SerialReader

    timed = [(0.0, FRAME), (0.4, FRAME), (0.8, FRAME), (1.2, FRAME), (1.3, JUNIOR_FRAME), (2.0, FRAME),
             (2.9, FRAME), (4.5, FRAME), (4.6, JUNIOR_FRAME)]
    master, path = pty_pair
    now = [MONO_START]
    events = Events()
    reader = SerialReader("entry", path, submit=events, clock=lambda: now[0], repeat_window_s=1.5,
                          reopen_min_s=0.05, reopen_max_s=0.2, read_timeout_s=0.05)
    reader.start()
    try:
        events.wait(lambda items: any(isinstance(e, ev.ReaderStatus) and e.online for e in items),
                    what="the reader to open the pty")
        for n, (t, frame) in enumerate(timed, 1):
            now[0] = MONO_START + t
            os.write(master, frame)
            # Filtered or passed, the frame is done before the clock moves on.
            events.wait(lambda _items, n=n: reader.counters["cards"] + reader.counters["repeats"] == n,
                        what=f"frame {n}")
    finally:
        reader.stop()
    service = [(e.key, e.format) for e in events.items if isinstance(e, ev.CardRead)]

    steps, prev = [], 0.0
    for t, frame in timed:
        steps.append(_serial(f"+{t - prev:.1f}" if steps else "08:00:00", frame))
        prev = t
    records = _records(_scenario(steps, gate={"readers": {"entry": "in"}, "wait_s": 0.5}), fp)
    simulated = [(r["card"], r["format"]) for r in records if r["type"].startswith("access.")]
    assert simulated == service
    assert len(service) == 4  # senior, junior, senior after the pause, junior after its own


# -- OSDP --------------------------------------------------------------------------------------


def _osdp_bus_events(payloads):
    """What the real OSDP adapter submits for libosdp card events (its event callback)."""
    osdp = pytest.importorskip("osdp", reason="libosdp is not installed (the osdp extra)")
    from agent.hw.osdp_reader import OsdpBus, OsdpReaderSpec

    events = Events()
    key = bytes.fromhex("8b1f3c00d2a94e57a0b6c1d2e3f40516")
    bus = OsdpBus(object(), [OsdpReaderSpec("entry", 101, key)], submit=events)
    formats = {"wiegand": osdp.CardFormat.Wiegand, "raw": osdp.CardFormat.Unspecified,
               "ascii": osdp.CardFormat.ASCII}
    for fmt, data, length in payloads:
        bus._on_event(0, {"event": osdp.Event.CardRead, "reader_no": 0, "direction": 0,
                          "format": formats[fmt], "length": length, "data": data})
    return events.items


def test_an_osdp_step_becomes_what_the_osdp_adapter_submits(fp):
    w26 = encode_w26(142, 51091)
    bad = ("1" if w26[0] == "0" else "0") + w26[1:]  # the even parity broken
    uid = 0x12008EC793  # a 40-bit raw card serial: its low 24 bits are the key
    steps = [
        {"at": "08:00:00", "osdp": w26, "reader": "entry"},
        {"at": "+10", "osdp": bad, "reader": "entry"},
        {"at": "+10", "osdp": f"{uid:040b}", "osdp_format": "raw", "reader": "entry"},
        {"at": "+10", "osdp": "0009357203", "osdp_format": "ascii", "reader": "entry"},
    ]
    sim, _ = _run(_scenario(steps, gate={"readers": {"entry": "in"}, "wait_s": 1.0}), fp)
    adapter = _osdp_bus_events([
        ("wiegand", int(w26 + "000000", 2).to_bytes(4, "big"), 26),
        ("wiegand", int(bad + "000000", 2).to_bytes(4, "big"), 26),
        ("raw", uid.to_bytes(5, "big"), 40),
        ("ascii", b"0009357203", 10),
    ])
    assert [type(e).__name__ for e in adapter] == ["CardRead", "ReaderError", "CardRead", "CardRead"]
    got = [r for r in sim.records if r["type"].startswith("access.") or r["type"] == "reader.error"]
    assert [(r["card"], r["format"]) for r in got if r["type"] != "reader.error"] == \
        [(e.key, e.format) for e in adapter if isinstance(e, ev.CardRead)]
    assert [r["kind"] for r in got if r["type"] == "reader.error"] == \
        [e.kind for e in adapter if isinstance(e, ev.ReaderError)] == ["parity"]
    assert {r["card"] for r in got if "card" in r} == {SENIOR_KEY}
    assert {r["format"] for r in got if r["type"].startswith("access.")} == {"osdp"}


def test_osdp_data_that_is_no_bits_is_refused_with_where():
    with pytest.raises(ScenarioError) as info:
        _scenario([{"at": "08:00", "osdp": "0101x", "reader": "entry"},
                   {"at": "08:01", "osdp_format": "ascii", "card": SENIOR, "reader": "entry"},
                   {"at": "08:02", "card": SENIOR, "reader": "entry", "hold": {"for": 1, "every": 0.5}}])
    problems = info.value.problems
    assert any(p.startswith("step 1, osdp: '0101x' is not bits") for p in problems), problems
    assert any(p.startswith("step 2, osdp_format: osdp_format goes with an osdp step") for p in problems), problems
    assert any(p.startswith("step 3, hold: hold is for a serial step") for p in problems), problems


# -- the step behind each record ----------------------------------------------------------------


def test_each_record_is_paired_with_the_step_that_caused_it(fp):
    sc = _scenario([
        {"at": "08:00:00", "card": SENIOR, "reader": "entry", "walk": 1.0},            # 1
        {"at": "08:01:00", "card": "100,60184", "reader": "entry"},                  # 2: times out
        {"at": "08:02:00", "rush": {"cards": [SENIOR, "100,60179"], "every": 3.0, "walk": 1.0}},  # 3
        {"at": "08:03:00", "fire": "open"},                                            # 4
    ])
    sim, out = _run(sc, fp)
    assert [rec for _n, rec in out] == sim.records  # no trace lines asked for
    assert [n for n, _rec in out] == sim.record_steps
    by = [(n, r["type"]) for n, r in out]
    assert by[0] == (0, "agent.started")
    assert (1, "access.granted") in by and (1, "passage") in by  # the walk's passage is its step's
    assert (2, "passage.timeout") in by  # the gate's timer, set by step 2's grant
    assert [n for n, t in by if t in ("access.granted", "passage")].count(3) == 4  # the rush is one step
    assert (4, "alarm.fire") in by
    assert {n for n, _t in by} == {0, 1, 2, 3, 4}
    # The records themselves carry the contract's fields only.
    assert all("step" not in r for r in sim.records)


def test_expect_can_name_the_step_and_a_step_that_does_not_exist_is_refused(fp):
    steps = [{"at": "08:00:00", "card": SENIOR, "reader": "entry", "walk": 1.0},
             {"at": "08:01:00", "card": SENIOR, "reader": "entry", "walk": 1.0}]
    sim, _ = _run(_scenario(steps), fp)
    good = [{"type": "passage", "step": 2, "count": 1}, {"type": "agent.started", "step": 0}]
    assert check_expectations(sim.records, good, steps=sim.record_steps) == []
    bad = [{"type": "passage", "step": 1, "count": 2}]
    assert check_expectations(sim.records, bad, steps=sim.record_steps) == \
        ["expect 1: {'type': 'passage', 'step': 1} matched 1 record(s), expected exactly 2"]
    with pytest.raises(ScenarioError) as info:
        _scenario(steps, expect=[{"type": "passage", "step": 3},
                                 {"sequence": [{"type": "passage"}, {"type": "passage", "step": 7}]}])
    text = "\n".join(info.value.problems)
    assert "expect 1, step: step 3 does not exist; the scenario has 2 step(s)" in text
    assert "expect 2, sequence/1/step: step 7 does not exist" in text


# -- ordered expectations -----------------------------------------------------------------------


def _apb_run(fp):
    steps = [{"at": "08:00:00", "card": SENIOR, "reader": "entry", "walk": 1.0},  # 1 in
             {"at": "08:01:00", "card": SENIOR, "reader": "entry"},               # 2 refused
             {"at": "13:00:00", "card": SENIOR, "reader": "exit", "walk": 1.0}]   # 3 out
    sc = _scenario(steps, gate={"readers": {"entry": "in", "exit": "out"}, "apb": "hard"})
    sim, _ = _run(sc, fp)
    return sim


def test_a_sequence_is_met_in_its_order_and_fails_out_of_it_saying_which_step_came_where(fp):
    sim = _apb_run(fp)
    in_order = [{"sequence": [{"type": "passage", "direction": "in"},
                              {"type": "access.denied", "reason": "antipassback", "note": "hands the card back"},
                              {"type": "passage", "direction": "out", "step": 3}]}]
    assert check_expectations(sim.records, in_order, steps=sim.record_steps) == []
    reversed_ = [{"sequence": [{"type": "passage", "direction": "out"},
                               {"type": "access.denied", "reason": "antipassback"}]}]
    [msg] = check_expectations(sim.records, reversed_, [40], steps=sim.record_steps)
    out_seq = next(r["seq"] for r in sim.records if r["type"] == "passage" and r["direction"] == "out")
    assert msg == ("expect 1 (line 40): sequence out of order: item 2 {'type': 'access.denied', 'reason': "
                   "'antipassback'} matched no record after item 1's, record "
                   f"#{out_seq} (passage) of step 3; it matched only records of step(s) 2")
    never = [{"sequence": [{"type": "passage"}, {"type": "passage.forced"}]}]
    assert check_expectations(sim.records, never, steps=sim.record_steps) == \
        ["expect 1: sequence item 2 {'type': 'passage.forced'} matched no record"]
    # Each item takes its own record: two grants are needed for two items.
    twice = [{"sequence": [{"type": "access.granted", "step": 3}, {"type": "access.granted", "step": 3}]}]
    assert check_expectations(sim.records, twice, steps=sim.record_steps) == \
        [("expect 1: sequence out of order: item 2 {'type': 'access.granted', 'step': 3} matched no record "
          f"after item 1's, record #{out_seq - 1} (access.granted) of step 3; it matched only records "
          "of step(s) 3")]


def test_a_sequence_entry_takes_only_its_items_and_each_item_is_one_match():
    steps = [{"at": "08:00:00", "card": SENIOR, "reader": "entry"}]
    with pytest.raises(ScenarioError) as info:
        _scenario(steps, expect=[{"sequence": [{"type": "access.granted"}], "count": 1, "type": "x"},
                                 {"sequence": [{"type": "access.granted", "min": 2}]},
                                 {"sequence": []},
                                 {"reason": "blocked"}])
    text = "\n".join(info.value.problems)
    assert "expect 1: a sequence entry holds only sequence (and note); move count, type into its items" in text
    assert "expect 2, sequence/0/min: min goes on a whole [[expect]] entry; a sequence item is one record" in text
    assert "expect 3, sequence: must not be empty" in text
    assert "expect 4, type: missing; it is required" in text  # neither a type nor a sequence


def test_the_cli_prints_the_steps_and_checks_a_sequence(tmp_path):
    sc = tmp_path / "order.toml"
    sc.write_text(
        f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n'
        '[gate]\nreaders = { entry = "in", exit = "out" }\napb = "hard"\n'
        '[[steps]]\nat = "08:00"\ncard = "142,51091"\nreader = "entry"\nwalk = 1.0\n'
        '[[steps]]\nat = "08:01"\ncard = "142,51091"\nreader = "entry"\n'
        '[[expect]]\nsequence = [{ type = "access.denied", step = 2 }, { type = "passage", step = 1 }]\n'
    )
    cmd = [sys.executable, "-m", "agent.cli", "simulate"]
    res = subprocess.run([*cmd, "--steps", str(sc)], check=False, capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "LANGUAGE": "en"})
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(d["step"], d["record"]["type"]) for d in lines] == [(0, "agent.started"), (1, "access.granted"), (1, "passage"),
                                                  (2, "access.denied")]
    res = subprocess.run([*cmd, "--check", "--pretty", str(sc)], check=False, capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, "LANGUAGE": "en"})
    assert res.returncode == 1
    assert "expect 1 (line 15): sequence out of order: item 2" in res.stderr
    assert "after item 1's, record #4 (access.denied) of step 2; it matched only records of step(s) 1" in res.stderr
    assert any(line.startswith("08:01:00.000 [2]   #4    access.denied") for line in res.stdout.splitlines()), \
        res.stdout


def test_pretty_lines_show_the_step_in_a_column():
    rec = {"ts": "2026-09-01T01:00:00.000Z", "seq": 12, "type": "passage", "direction": "in"}
    assert format_pretty(rec, step=3).startswith("01:00:00.000 [3]   #12   passage")
    assert format_pretty(rec).startswith("01:00:00.000 #12   passage")


@pytest.mark.parametrize("name", ["held-card.toml", "antipassback.toml", "fire-drill.toml", "osdp-reader.toml"])
def test_examples_check_their_order(name):
    sc = load_scenario(ROOT / "examples" / "scenarios" / name)
    assert any("sequence" in e for e in sc.expect), f"{name} has no ordered expectation"


def test_an_out_of_order_sequence_is_told_in_russian(tmp_path):
    sc = tmp_path / "order.toml"
    sc.write_text(
        f'start = "2026-09-01T07:30:00+07:00"\nacl = "{ACL}"\n'
        '[[steps]]\nat = "08:00"\ncard = "142,51091"\nreader = "entry"\nwalk = 1.0\n'
        '[[expect]]\nsequence = [{ type = "passage" }, { type = "access.granted" }]\n'
        '[[expect]]\nsequence = [{ type = "passage.forced" }]\n'
    )
    res = subprocess.run([sys.executable, "-m", "agent.cli", "simulate", "--check", str(sc)], check=False,
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "LANGUAGE": "ru", "LANG": "ru_RU.UTF-8"})
    assert res.returncode == 1
    assert "ожидание 1 (строка 8): нарушен порядок sequence: под элемент 2 {'type': 'access.granted'} не подошла " \
           "ни одна запись после записи элемента 1, #3 (passage) шага 1; подошли только записи шагов 1" in res.stderr
    assert "ожидание 2 (строка 10): под элемент 1 последовательности (sequence) {'type': 'passage.forced'} " \
           "не подошла ни одна запись" in res.stderr


@pytest.mark.parametrize("hold", [{"for": 1e300, "every": 1e-300}, {"for": 2501, "every": 0.25}])
def test_a_hold_of_too_many_frames_is_refused_not_expanded(hold):
    # Expanded, 1e600 frames would fill memory before any message: refused first, with where.
    with pytest.raises(ScenarioError) as info:
        _scenario([_serial("08:00:00", hold=hold)])
    assert [p.split(":")[0] for p in info.value.problems] == ["step 1, hold"]
    assert "frames; send them less often (a larger every)" in info.value.problems[0]
    with pytest.raises(ScenarioError) as info:  # TOML's inf and nan: the schema's "not a number"
        _scenario([_serial("08:00:00", hold={"for": float("inf"), "every": 1.0})])
    assert [p.split(":")[0] for p in info.value.problems] == ["step 1, hold/for"]
