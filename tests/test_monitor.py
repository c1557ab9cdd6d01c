# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""``gate-agent monitor``: the view's counters from the records, the journal
source (read-only, beside the writing service) and the broker source."""
from __future__ import annotations

import argparse
import io
import json
import re
import threading
import time
from collections import Counter
from datetime import datetime

import pytest

from agent.core.events import Now
from agent.core.records import make_record
from agent.i18n import set_language
from agent.tools.journaltool import local_time_text
from agent.tools.monitor import (
    CLEAR,
    GateView,
    JournalSource,
    MqttSource,
    add_monitor_parser,
    run_view,
)
from agent.uplink.journal import Journal
from tests.broker import broker, make_broker, wait_until  # noqa: F401

BOOT = "b"


@pytest.fixture(autouse=True)
def _english():
    set_language("en")
    yield
    set_language(None)


def morning() -> list[dict]:
    """A few minutes of a gate, as records (the input of the view)."""
    t = time.time()
    rows = [
        ("agent.started", {"version": "0.1.0", "fastpath": "pure", "acl_version": "v1", "mode": "normal"}),
        ("access.granted", {"reader": "entry", "direction": "in", "card": 6613779, "format": "w26", "person": "p1"}),
        ("passage", {"direction": "in", "source": "card", "person": "p1", "card": 6613779, "after_ms": 900}),
        ("access.denied", {"reader": "entry", "direction": "in", "card": 5, "format": "w26", "reason": "unknown_card"}),
        ("access.denied", {"reader": "entry", "direction": "in", "card": 6, "format": "w26", "reason": "blocked"}),
        ("access.denied", {"reader": "exit", "direction": "out", "card": 7, "format": "w26",
                           "reason": "unknown_card"}),
        ("reader.error", {"reader": "entry", "kind": "parity", "detail": "x", "raw": "101"}),
        ("alarm", {"kind": "tamper", "active": True, "detail": "lid open"}),
        ("access.granted", {"reader": "exit", "direction": "out", "card": 6613780, "format": "w26", "person": "p2"}),
        ("passage", {"direction": "out", "source": "card", "person": "p2", "card": 6613780, "after_ms": 800}),
        ("passage", {"direction": "out", "source": "button", "person": None, "card": None, "after_ms": 500}),
        ("passage.forced", {"direction": "in"}),
        ("alarm.fire", {"active": True}),
        ("mode.changed", {"from": "normal", "to": "fire", "by": "fire_loop"}),
    ]
    return [make_record(kind, Now(i, t + i, True), BOOT, **fields) for i, (kind, fields) in enumerate(rows)]


def expected(records: list[dict]) -> dict:
    """The figures, counted here from the records themselves."""
    by = Counter(r["type"] for r in records)
    return {
        "granted": by["access.granted"],
        "denied": by["access.denied"],
        "denied_by_reason": dict(Counter(r["reason"] for r in records if r["type"] == "access.denied")),
        "passages": by["passage"],
        "passages_by_direction": dict(Counter(r["direction"] for r in records if r["type"] == "passage")),
        "forced": by["passage.forced"],
        "reader_errors": by["reader.error"],
    }


def numbered(records: list[dict]) -> list[dict]:
    return [{"id": f"j:{i}", "seq": i, **r} for i, r in enumerate(records, 1)]


def test_the_view_counts_what_the_records_say():
    recs = numbered(morning())
    view = GateView("s", "g", lines=5)
    for r in recs:
        view.add_record(r)
    s = view.summary()
    assert {k: s[k] for k in expected(recs)} == expected(recs)
    assert s["alarms"] == ["tamper"] and s["fire"] is True and s["mode"] == "fire"
    view.add_record({"seq": 99, "type": "alarm", "kind": "tamper", "active": False})
    assert view.summary()["alarms"] == []


def test_the_frame_shows_the_gate_the_counters_and_only_the_last_events():
    recs = numbered(morning())
    view = GateView("school-17", "main-1", lines=3)
    for r in recs:
        view.add_record(r)
    view.set_broker("connected")
    view.set_status({"v": 1, "state": "online", "acl_version": "v7"})
    view.set_telemetry({"backlog": 42, "oldest_pending_s": 12.0, "acl_version": "v7"})
    frame = "\n".join(view.render(width=10_000))
    assert "school-17/main-1" in frame and "FIRE" in frame and "connected (online)" in frame and "v7" in frame
    assert "backlog to the server: 42" in frame
    assert "unknown_card 2" in frame and "blocked 1" in frame
    shown = [line for line in frame.splitlines() if line.split()[1:2] and line.split()[1].startswith("#")]
    assert [line.split()[1] for line in shown] == [f"#{r['seq']}" for r in recs[-3:]]


def test_the_journal_source_follows_the_service_writing_read_only(tmp_path):
    path = tmp_path / "journal.db"
    with Journal(path, boot=BOOT) as journal:
        first = journal.commit(morning()[:4])
        view = GateView("s", "g")
        source = JournalSource(view, path, history=10, status_text=lambda: "mode normal; backlog 4")
        source.load()
        assert view.last_seq == first[-1]["seq"]
        more = journal.commit(morning()[4:])  # the service goes on writing
        source.poll_once()
        all_recs = first + more
        s = view.summary()
        assert {k: s[k] for k in expected(all_recs)} == expected(all_recs)
        assert s["backlog"] == len(all_recs)  # nothing confirmed by a server yet
        assert view.status_line == "mode normal; backlog 4"
        journal.sync()
        journal.ack_upto(journal.id, len(first))
        journal.maintenance(time.time())
        source.poll_once()
        assert view.summary()["backlog"] == len(more)
        source.stop()


def test_once_prints_one_frame_without_screen_codes(tmp_path, capsys):
    path = tmp_path / "journal.db"
    with Journal(path, boot=BOOT) as journal:
        recs = journal.commit(morning())
    parser = argparse.ArgumentParser()
    add_monitor_parser(parser.add_subparsers())
    args = parser.parse_args(["monitor", "--db", str(path), "--once", "--lines", "2", "--site", "s", "--gate", "g"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert f"#{recs[-1]['seq']}" in out and f"#{recs[-2]['seq']}" in out and f"#{recs[-3]['seq']} " not in out


def test_a_missing_journal_exits_2_with_the_fix(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_monitor_parser(parser.add_subparsers())
    args = parser.parse_args(["monitor", "--db", str(tmp_path / "none.db"), "--once"])
    assert args.func(args) == 2
    assert "--db" in capsys.readouterr().err


def test_live_mode_redraws_and_plain_mode_prints_new_events_as_lines():
    view = GateView("s", "g")
    recs = numbered(morning())
    for r in recs[:2]:
        view.add_record(r)
    out = io.StringIO()
    run_view(view, out, stop=threading.Event(), live=True, duration_s=0.05, redraw_s=0.01)
    assert out.getvalue().startswith(CLEAR)
    plain = io.StringIO()
    view.take_new()
    view.add_record(recs[2])
    run_view(view, plain, stop=threading.Event(), live=False, duration_s=0.05, redraw_s=0.01, plain_summary_s=0.0)
    text = plain.getvalue()
    assert CLEAR not in text and f"#{recs[2]['seq']}" in text and f"#{recs[1]['seq']} " not in text
    assert "granted" in text  # the counter line


def test_the_broker_source_shows_the_gate_as_the_regional_server_sees_it(broker):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.contract import topics

    view = GateView("school-17", "main-1")
    source = MqttSource(view, broker.host, broker.port, site="school-17", gate="main-1").start()
    try:
        assert source.ready.wait(10)
        t = topics("school-17", "main-1")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id="fake-gate")
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        recs = numbered(morning())
        for r in recs:
            pub.publish(t["events"], json.dumps(r), qos=1).wait_for_publish(5)
        pub.publish(t["status"], json.dumps({"v": 1, "state": "offline", "boot": "b", "reason": "will"}),
                    qos=1).wait_for_publish(5)
        pub.publish(t["telemetry"], json.dumps({"backlog": 17, "oldest_pending_s": 3.5}), qos=1).wait_for_publish(5)
        # Another gate's events are not this view's.
        pub.publish(topics("school-17", "side")["events"], json.dumps(recs[1]), qos=1).wait_for_publish(5)
        wait_until(lambda: view.summary()["backlog"] == 17 and view.summary()["events"] == len(recs),
                   what="the gate's messages")
        pub.loop_stop()
        pub.disconnect()
        assert view.gate_state == "offline" and view.broker == "connected"
        s = view.summary()
        assert {k: s[k] for k in expected(recs)} == expected(recs)
    finally:
        source.stop()


def _denials(n: int, t0: float, *, synced: bool = True) -> list[dict]:
    reasons = ["outside_schedule", "exit_restricted", "unknown_card", "blocked"]
    return numbered([make_record("access.denied", Now(i, t0 + i, synced), BOOT, reader="entry", direction="in",
                                 card=6613779, format="w26", person="p-0042", reason=reasons[i % 4])
                     for i in range(n)])


def test_at_80_columns_nothing_is_cut_but_event_details_and_the_screen_fits():
    view = GateView("school-17", "main-1", lines=12)
    recs = _denials(30, time.time() - 60)
    for r in recs:
        view.add_record(r)
    for i in range(8):
        view.note(f"broker: mosquitto pid {i} on 127.0.0.1:4{i}345")
    frame = view.render(width=80, height=24)
    assert len(frame) <= 23 and all(len(line) <= 80 for line in frame)
    text = "\n".join(frame)
    # Every denial reason on screen whole, in the counters and on each event line.
    words = " ".join(" ".join(frame).split())
    for reason, n in Counter(r["reason"] for r in recs).items():
        assert f"{reason} {n}" in words, text
    events = [line for line in frame if "access.denied" in line]
    assert events and all(re.search(r"reason=[a-z_]+( |…|$)", line) for line in events), text
    assert all(re.search(r"reason=(outside_schedule|exit_restricted|unknown_card|blocked)\b", line)
               for line in events), text
    # More than 3 notes kept: the first (the broker's port) is still there.
    assert "127.0.0.1:40345" in text and "127.0.0.1:47345" in text


def test_the_counters_say_their_period_and_clock_is_explained():
    view = GateView("s", "g")
    start = time.time() - 3600
    for r in _denials(3, start, synced=False):
        view.add_record(r)
    frame = "\n".join(view.render(width=10_000))
    begin = datetime.fromtimestamp(start).astimezone()
    if begin.date() == datetime.now().astimezone().date():
        since = begin.strftime("%H:%M:%S")
    else:  # run in the first hour of a day: the counters began yesterday, and say its date
        since = local_time_text(begin)
    assert f"counters: since {since}, events counted: 3" in frame
    assert "clock?" in frame and "not synchronised" in frame


def test_a_stopped_service_is_in_no_mode():
    view = GateView("s", "g")
    view.add_record({"seq": 1, "type": "agent.started", "mode": "normal", "ts": "2026-09-01T01:00:00.000Z"})
    view.set_service_state("active")
    assert "mode normal" in view.render(width=10_000)[0]
    view.set_service_state("inactive")
    frame = view.render(width=10_000)
    assert "mode normal" not in frame[0] and "mode ?" in frame[0]
    assert any("not running" in line and "inactive" in line for line in frame)
    view.set_service_state("active")
    view.add_record({"seq": 2, "type": "agent.started", "mode": "normal", "ts": "2026-09-01T01:01:00.000Z"})
    assert "mode normal" in view.render(width=10_000)[0]
    # Over MQTT: the agent's own offline status on an orderly stop.
    remote = GateView("s", "g")
    remote.add_record({"seq": 1, "type": "agent.started", "mode": "normal", "ts": "2026-09-01T01:00:00.000Z"})
    remote.set_status({"v": 1, "state": "offline", "boot": "b", "reason": "shutdown"})
    frame = remote.render(width=10_000)
    assert "mode ?" in frame[0] and any("stopped" in line for line in frame)


def test_the_journal_source_reads_the_services_state(tmp_path):
    path = tmp_path / "journal.db"
    with Journal(path, boot=BOOT) as journal:
        journal.commit(morning()[:1])
    view = GateView("s", "g")
    source = JournalSource(view, path, status_text=lambda: None, service_state=lambda: "failed")
    source.load()
    try:
        assert view.summary()["mode"] == "?"
        assert any("failed" in line for line in view.render(width=10_000))
    finally:
        source.stop()
