# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
"""Remote commands: every forged, replayed, expired, misaddressed, unsigned,
invalid, retained or MQTT-expired command is refused with its reason (in the
reply and in a command.result record); accepted ones become the right core
events, and the gate's own result comes back on the response topic with the
correlation data. The last tests go through a real mosquitto with the
`gate-agent cmd` tool.
"""
from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.contract import validate
from agent.core import events as ev
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.downlink import Downlink
from agent.downlink.signing import (
    SignatureError,
    generate_keypair,
    make_command,
    public_key_b64,
    sign_command,
    verify,
)
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

SITE, GATE = "school-17", "main"
KEY, PUB = generate_keypair()
KEY2, PUB2 = generate_keypair()  # the next key during a rotation
OTHER_KEY, _ = generate_keypair()  # nobody trusts it
KEY_ID, KEY2_ID = "region-2026a", "region-2026b"
T0 = 1_788_300_000.0  # 2026-09-01T...Z: the gate's wall clock in these tests
REPLY = f"gate/v1/{SITE}/{GATE}/reply/t1"
CORR = b"\x01corr-17"
PROPS = {"response_topic": REPLY, "correlation_data": CORR, "message_expiry_interval": 20}


def command(name: str = "open", args: dict | None = None, *, counter: int = 1, key=KEY,
            key_id: str = KEY_ID, site: str = SITE, gate: str = GATE, now: float = T0,
            ttl_s: float = 20.0, request_id: str | None = None, **overrides) -> dict:
    if args is None:
        args = {"open": {"direction": "in"}, "set_mode": {"mode": "lockdown"}}.get(name, {})
    fields = make_command(site, gate, name, args, key_id=key_id, counter=counter, now=now,
                          ttl_s=ttl_s, request_id=request_id or f"r-{name}-{counter}")
    fields.update(overrides)
    return sign_command(key, fields)


class Harness:
    """A Downlink with recording submit/publish and settable clocks (wall and monotonic;
    flood windows close when the test calls ``dl.flush_flood()``)."""

    def __init__(self, tmp_path: Path, fp, **kw) -> None:
        self.events: list = []
        self.published: list[tuple[str, bytes, dict]] = []
        self.wall = T0
        self.mono = 5000.0
        self.synced = True
        self.state_dir = tmp_path / "state"
        kw.setdefault("trusted_keys", {KEY_ID: PUB})
        self.dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=self.state_dir,
                           submit=self.events.append,
                           publish=lambda t, p, props: self.published.append((t, p, props)),
                           wall=lambda: self.wall, clock_synced=lambda: self.synced,
                           monotonic=lambda: self.mono, flood_timers=False,
                           acl_async=False, **kw)

    def send(self, msg, props=PROPS, retain=None, topic=f"gate/v1/{SITE}/{GATE}/cmd") -> None:
        payload = msg if isinstance(msg, bytes) else json.dumps(msg).encode()
        self.dl.on_message(topic, payload, dict(props) if props is not None else None, retain)

    def replies(self) -> list[dict]:
        out = []
        for topic, payload, props in self.published:
            assert topic == REPLY
            assert props.get("correlation_data") == CORR
            reply = json.loads(payload)
            assert validate("cmd-reply", reply) == []
            out.append(reply)
        return out

    def reports(self, rtype: str) -> list[dict]:
        return [e.fields for e in self.events if isinstance(e, ev.Report) and e.type == rtype]

    def core_events(self) -> list:
        return [e for e in self.events if not isinstance(e, ev.Report)]


@pytest.fixture
def h(tmp_path, fp) -> Harness:
    return Harness(tmp_path, fp)


def assert_refused(h: Harness, reason: str, request_id: str | None = None) -> None:
    """Nothing reached the core; one record and one reply say refused for `reason`."""
    assert h.core_events() == []
    results = h.reports("command.result")
    assert [r["result"] for r in results] == ["refused"]
    assert results[0]["reason"] == reason
    replies = h.replies()
    assert len(replies) == 1
    assert replies[0]["result"] == "refused" and replies[0]["reason"] == reason
    assert replies[0]["detail"]  # says why
    if request_id is not None:
        assert results[0]["request_id"] == replies[0]["request_id"] == request_id


# --- accepted -----------------------------------------------------------------------------


def test_open_becomes_a_remote_open_with_its_request_id(h):
    h.send(command("open", {"direction": "out"}, request_id="r-1"))
    assert h.core_events() == [ev.RemoteOpen("out", request_id="r-1")]
    assert h.published == []  # the reply waits for the gate's own record


def test_set_mode_and_fire_reset_become_core_events_by_command(h):
    h.send(command("set_mode", {"mode": "entry_only"}, counter=1, request_id="r-1"))
    h.send(command("fire_reset", counter=2, request_id="r-2"))
    assert h.core_events() == [ev.SetMode("entry_only", by="command", request_id="r-1"),
                               ev.FireReset(by="command", request_id="r-2")]


class GateLoop:
    """Feeds what the Downlink submits to a real Gate and its records back to on_record."""

    def __init__(self, h: Harness, fp) -> None:
        self.h = h
        self.gate = Gate(GateConfig(site=SITE, gate=GATE), fp, None, boot="b-1")
        self.sink = SequenceSink("j")
        self.t = 100.0
        self.sink.commit(self.gate.start(self.now()).records)
        self.done = 0

    def now(self) -> ev.Now:
        self.t += 0.01
        return ev.Now(mono=self.t, wall=T0 + self.t, synced=True)

    def run(self) -> list[dict]:
        """Handle every event submitted since the last run, like the gate thread."""
        out = []
        while self.done < len(self.h.events):
            event = self.h.events[self.done]
            self.done += 1
            for rec in self.sink.commit(self.gate.handle(event, self.now()).records):
                assert validate("event", rec) == []
                out.append(rec)
                self.h.dl.on_record(rec)
        return out


def test_the_gates_result_is_replied_with_the_correlation_data(h, fp):
    loop = GateLoop(h, fp)
    h.send(command("set_mode", {"mode": "lockdown"}, request_id="r-lock"))
    records = loop.run()
    assert loop.gate.mode == "lockdown"
    results = [r for r in records if r["type"] == "command.result"]
    assert [(r["request_id"], r["result"]) for r in results] == [("r-lock", "done")]
    assert h.replies() == [{"v": 1, "request_id": "r-lock", "command": "set_mode", "result": "done"}]


def test_set_mode_during_fire_is_refused_by_the_gate_and_the_reply_says_fire(h, fp):
    loop = GateLoop(h, fp)
    loop.sink.commit(loop.gate.handle(ev.FireLoop(open=True), loop.now()).records)
    h.send(command("set_mode", {"mode": "normal"}, request_id="r-f"))
    loop.run()
    assert loop.gate.mode == "fire"
    [reply] = h.replies()
    assert (reply["result"], reply["reason"], reply["request_id"]) == ("refused", "fire", "r-f")
    assert "fire" in reply["detail"]


def test_open_goes_through_in_lockdown_and_is_replied_done(h, fp):
    loop = GateLoop(h, fp)
    h.send(command("set_mode", {"mode": "lockdown"}, counter=1, request_id="r-1"))
    h.send(command("open", {"direction": "in"}, counter=2, request_id="r-2"))
    loop.run()
    assert loop.gate.pending == ("in", "remote")
    assert [(r["request_id"], r["result"]) for r in h.replies()] == [("r-1", "done"), ("r-2", "done")]


def test_a_command_without_response_topic_still_acts_and_records(h, fp):
    loop = GateLoop(h, fp)
    h.send(command("open", {"direction": "in"}, request_id="r-quiet"),
           props={"message_expiry_interval": 20})
    records = loop.run()
    assert [r["request_id"] for r in records if r["type"] == "command.result"] == ["r-quiet"]
    assert loop.gate.pending == ("in", "remote")
    assert h.published == []


def test_status_replies_with_a_snapshot(h):
    h.send(command("status", request_id="r-s"))
    [reply] = h.replies()
    assert reply["result"] == "done" and reply["request_id"] == "r-s"
    assert reply["data"]["site"] == SITE and reply["data"]["gate"] == GATE
    assert reply["data"]["acl_version"] is None  # no list yet
    assert h.reports("command.result") == [{"request_id": "r-s", "command": "status", "result": "done"}]


def test_acl_snapshot_asks_the_server_for_a_snapshot(h):
    h.send(command("acl_snapshot", request_id="r-a"))
    assert h.reports("acl.requested") == [{"reason": "command", "have": None}]
    assert h.reports("command.result")[0]["result"] == "done"
    assert h.replies()[0]["result"] == "done"


def test_two_trusted_keys_during_a_rotation_each_with_its_own_counter(tmp_path, fp):
    h = Harness(tmp_path, fp, trusted_keys={KEY_ID: PUB, KEY2_ID: PUB2})
    h.send(command("open", counter=50, key=KEY, key_id=KEY_ID))
    h.send(command("open", counter=1, key=KEY2, key_id=KEY2_ID))
    assert len(h.core_events()) == 2
    assert h.reports("command.result") == []


# --- refused ---------------------------------------------------------------------------------


def test_forged_with_an_untrusted_key_under_a_trusted_key_id(h):
    h.send(command(key=OTHER_KEY, request_id="r-forged"))
    assert_refused(h, "bad_signature", "r-forged")


def test_tampered_arguments_break_the_signature(h):
    msg = command("open", {"direction": "in"})
    msg["args"]["direction"] = "out"
    h.send(msg)
    assert_refused(h, "bad_signature")


def test_tampered_address_breaks_the_signature_before_misaddressed(h):
    msg = command(gate="side")
    msg["gate"] = GATE  # re-aimed at this gate by someone without the key
    h.send(msg)
    assert_refused(h, "bad_signature")


def test_unknown_key_id_is_a_bad_signature(h):
    h.send(command(key=OTHER_KEY, key_id="someone-else"))
    assert_refused(h, "bad_signature")


def test_unsigned_is_refused(h):
    msg = command()
    del msg["sig"], msg["key_id"]
    h.send(msg)
    assert_refused(h, "unsigned")


def test_unsigned_is_accepted_only_where_the_config_allows_it(tmp_path, fp):
    h = Harness(tmp_path, fp, allow_unsigned=True)
    msg = command(counter=3)
    del msg["sig"], msg["key_id"]
    h.send(msg)
    assert h.core_events() == [ev.RemoteOpen("in", request_id=msg["request_id"])]
    h.send(msg)  # the counter still stops a replay of an unsigned command
    assert h.reports("command.result")[0]["reason"] == "replayed"


def test_a_lab_gate_still_refuses_a_bad_signature(tmp_path, fp):
    h = Harness(tmp_path, fp, allow_unsigned=True)
    h.send(command(key=OTHER_KEY))
    assert_refused(h, "bad_signature")


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b"\xff\xfe", b'{"v": 1}', b"NaN"])
def test_unreadable_messages_are_invalid_with_an_empty_request_id(h, payload):
    h.send(payload)
    assert_refused(h, "invalid", "")


def test_schema_violations_are_invalid_and_keep_the_request_id(h):
    h.send(command("set_mode", {"mode": "fire"}, request_id="r-fire-mode"))
    assert_refused(h, "invalid", "r-fire-mode")


def test_an_unknown_extra_field_is_invalid(h):
    h.send(command(extra="x"))
    assert_refused(h, "invalid")


def test_misaddressed_to_another_gate_or_site(h):
    h.send(command(gate="side", counter=1))
    h.send(command(site="school-18", counter=2))
    assert h.core_events() == []
    assert [r["reason"] for r in h.reports("command.result")] == ["misaddressed", "misaddressed"]
    assert [r["reason"] for r in h.replies()] == ["misaddressed", "misaddressed"]


def test_expired_in_the_past(h):
    h.send(command(now=T0 - 60, ttl_s=20))  # expired 40 s ago
    assert_refused(h, "expired")


def test_a_command_valid_for_longer_than_max_age_is_expired(h):
    h.send(command(ttl_s=3600))
    assert_refused(h, "expired")


def test_a_message_past_its_mqtt_expiry_is_refused_expired(h):
    h.send(command(), props={**PROPS, "message_expiry_interval": 0})
    assert_refused(h, "expired")


def test_a_command_without_mqtt_message_expiry_is_invalid(h):
    props = {k: v for k, v in PROPS.items() if k != "message_expiry_interval"}
    h.send(command(), props=props)
    assert_refused(h, "invalid")


@pytest.mark.parametrize("how", ["flag", "property"])
def test_a_retained_command_is_never_acted_on(h, how):
    if how == "flag":
        h.send(command(), retain=True)
    else:
        h.send(command(), props={**PROPS, "retain": True})
    assert_refused(h, "invalid")
    assert "retained" in h.replies()[0]["detail"]


def test_replayed_same_and_lower_counter(h):
    h.send(command(counter=10, request_id="r-10"))
    h.send(command(counter=10, request_id="r-10"))  # the same message again
    h.send(command(counter=9, request_id="r-9"))  # an older one
    assert h.core_events() == [ev.RemoteOpen("in", request_id="r-10")]
    assert [r["reason"] for r in h.reports("command.result")] == ["replayed", "replayed"]


def test_the_counter_survives_a_restart(tmp_path, fp):
    first = Harness(tmp_path, fp)
    msg = command(counter=77)
    first.send(msg)
    assert len(first.core_events()) == 1
    second = Harness(tmp_path, fp)  # a new Downlink on the same state directory
    second.send(msg)
    assert_refused(second, "replayed")
    counters = second.state_dir / "counters.json"
    assert counters.stat().st_mode & 0o777 == 0o600


def test_a_refused_command_does_not_use_up_its_counter(h):
    h.send(command(counter=5, now=T0 - 600))  # expired
    h.send(command(counter=5))
    assert [r["reason"] for r in h.reports("command.result")] == ["expired"]
    assert len(h.core_events()) == 1


@pytest.mark.parametrize("msg_kw, props, reason", [
    # Each breaks two rules; the earlier check in the contract's order names it.
    ({"args": {"direction": "sideways"}, "strip_sig": True}, PROPS, "invalid"),  # invalid + unsigned
    ({"key": OTHER_KEY, "gate": "side"}, PROPS, "bad_signature"),  # bad sig + misaddressed
    ({"gate": "side", "now": T0 - 600}, PROPS, "misaddressed"),  # misaddressed + expired
    ({"now": T0 - 600, "counter": 1}, PROPS, "expired"),  # expired + replayed
])
def test_refusals_are_checked_in_the_contract_order(h, msg_kw, props, reason):
    h.send(command(counter=1, request_id="r-first"))  # counter 1 is used from now on
    h.events.clear()
    h.published.clear()
    strip = msg_kw.pop("strip_sig", False)
    msg = command(counter=msg_kw.pop("counter", 2), **msg_kw)
    if strip:
        del msg["sig"], msg["key_id"]
    h.send(msg, props=props)
    assert_refused(h, reason)


def test_an_hour_old_command_is_expired_against_the_floor_with_the_clock_unsynchronised(h):
    """Finding 8: no RTC, no NTP yet, the clock an hour behind: a command that expired an
    hour before the latest signed server time must not run."""
    h.send(command(counter=1, request_id="r-now"))  # issued at T0: the floor is T0
    assert h.core_events() == [ev.RemoteOpen("in", request_id="r-now")]
    h.wall, h.synced = T0 - 3600, False  # the board restarted without its clock
    h.send(command(counter=2, now=T0 - 3620, request_id="r-old"))  # expired at T0 - 3600
    assert h.core_events() == [ev.RemoteOpen("in", request_id="r-now")]
    assert h.reports("command.result")[-1] == {"request_id": "r-old", "command": "open",
                                               "result": "refused", "reason": "expired"}
    [reply] = h.replies()
    assert reply["reason"] == "expired" and "behind the time floor" in reply["detail"]
    assert h.reports("alarm") == []  # nothing was accepted unchecked


def test_a_command_fresh_after_the_floor_still_runs_unsynchronised_and_says_so(h):
    h.send(command(counter=1, request_id="r-1"))
    h.wall, h.synced = T0 - 3600, False
    h.send(command(counter=2, now=T0 + 5, request_id="r-2"))  # within its life after the floor
    assert h.core_events()[-1] == ev.RemoteOpen("in", request_id="r-2")
    [alarm] = h.reports("alarm")
    assert (alarm["kind"], alarm["active"]) == ("expiry_unchecked", True)
    assert "r-2" in alarm["detail"] and "floor" in alarm["detail"]
    assert h.dl.wall_floor() == pytest.approx(T0 + 5)  # its issued_at raised the floor
    h.send(command(counter=2, now=T0 + 5, request_id="r-2"))  # the counter still stops a replay
    assert h.reports("command.result")[-1]["reason"] == "replayed"
    h.wall, h.synced = T0 + 10, True
    h.send(command(counter=3, now=T0 + 10, request_id="r-3"))
    assert h.reports("alarm")[-1] == {"kind": "expiry_unchecked", "active": False,
                                      "detail": h.reports("alarm")[-1]["detail"]}


def test_the_floor_survives_a_restart(tmp_path, fp):
    first = Harness(tmp_path, fp)
    first.send(command(counter=1, request_id="r-1"))
    first.dl.close()
    stored = json.loads((first.state_dir / "counters.json").read_text())
    assert stored["floor"] == pytest.approx(T0, abs=1)
    second = Harness(tmp_path, fp)  # the next boot: no RTC, no NTP, an hour behind
    second.wall, second.synced = T0 - 3600, False
    assert second.dl.wall_floor() == pytest.approx(T0, abs=1)
    second.send(command(counter=2, now=T0 - 1800, request_id="r-late"))  # expired T0 - 1780
    assert_refused(second, "expired", "r-late")


def test_the_floor_moves_on_with_the_monotonic_clock(h):
    h.send(command(counter=1, request_id="r-1"))
    h.mono += 600  # ten minutes later, by the monotonic clock
    assert h.dl.wall_floor() == pytest.approx(T0 + 600)
    h.wall, h.synced = T0 - 3600, False
    h.send(command(counter=2, now=T0 + 60, request_id="r-2"))  # expires T0 + 80, before T0 + 600
    assert h.reports("command.result")[-1]["reason"] == "expired"


def test_a_command_issued_far_ahead_of_a_synchronised_clock_is_refused_and_sets_no_floor(h):
    h.send(command(counter=1, now=T0 + 3600, request_id="r-future"))
    assert_refused(h, "expired", "r-future")
    assert "ahead of this gate's synchronised clock" in h.replies()[0]["detail"]
    assert h.dl.wall_floor() == 0.0


def test_with_the_clock_unsynchronised_the_servers_signed_time_is_believed(h):
    h.synced = False
    h.send(command(counter=1, now=T0 + 3600, request_id="r-ahead"))  # the gate's clock is behind
    assert h.core_events() == [ev.RemoteOpen("in", request_id="r-ahead")]
    assert h.dl.wall_floor() == pytest.approx(T0 + 3600)
    # NTP now says T0: a synchronised clock an hour behind the signed time is a fault, flagged once.
    h.synced = True
    h.dl.status()
    h.dl.status()
    alarms = [a for a in h.reports("alarm") if a["kind"] == "clock_behind_floor"]
    assert [a["active"] for a in alarms] == [True]
    assert h.dl.stats()["time_floor"] == pytest.approx(T0 + 3600)


def test_a_command_living_longer_than_max_age_is_expired_even_unsynchronised(h):
    h.synced = False
    h.send(command(ttl_s=3600, request_id="r-long"))
    assert_refused(h, "expired", "r-long")
    assert "3600 s" in h.replies()[0]["detail"]


def test_a_command_without_issued_at_is_still_taken_and_leaves_the_floor(h):
    fields = make_command(SITE, GATE, "open", {"direction": "in"}, key_id=KEY_ID, counter=1, now=T0,
                          request_id="r-v1")
    del fields["issued_at"]  # a server that does not send it yet
    h.send(sign_command(KEY, fields))
    assert h.core_events() == [ev.RemoteOpen("in", request_id="r-v1")]
    assert h.dl.wall_floor() == 0.0


def test_a_refused_but_signed_command_still_raises_the_floor(h):
    h.send(command(counter=1, gate="side", request_id="r-side"))  # misaddressed, but signed at T0
    assert h.reports("command.result")[-1]["reason"] == "misaddressed"
    assert h.dl.wall_floor() == pytest.approx(T0)
    h.send(command(counter=2, key=OTHER_KEY, now=T0 + 50, request_id="r-forged"))
    assert h.dl.wall_floor() == pytest.approx(T0)  # a forgery proves nothing


def test_the_mqtt_expiry_is_checked_even_with_the_clock_unsynchronised(h):
    h.synced = False
    h.send(command(), props={**PROPS, "message_expiry_interval": 0})
    assert_refused(h, "expired")


def test_messages_on_other_topics_are_ignored(h):
    h.send(command(), topic=f"gate/v1/{SITE}/side/cmd")
    assert h.events == [] and h.published == []


# --- the reply subtree ------------------------------------------------------------------------


@pytest.mark.parametrize("topic", [f"gate/v1/{SITE}/{GATE}/events", f"gate/v1/{SITE}/{GATE}/status",
                                   f"gate/v1/{SITE}/side/reply/x", f"gate/v1/{SITE}/{GATE}/replying",
                                   "elsewhere/entirely"])
def test_a_response_topic_outside_the_reply_subtree_gets_no_reply_and_nothing_done(h, topic):
    h.send(command("status", request_id="r-s"), props={**PROPS, "response_topic": topic})
    assert h.published == []
    assert h.reports("command.result") == [{"request_id": "r-s", "command": "status",
                                            "result": "refused", "reason": "invalid"}]
    h.send(b'{"junk": 1}', props={**PROPS, "response_topic": topic})  # a refusal neither
    assert h.published == []
    assert len(h.reports("command.result")) == 2


@pytest.mark.parametrize("topic", [f"gate/v1/{SITE}/{GATE}/reply", f"gate/v1/{SITE}/{GATE}/reply/a/b"])
def test_a_response_topic_in_the_reply_subtree_is_answered(h, topic):
    h.send(command("status", request_id="r-s"), props={**PROPS, "response_topic": topic})
    [(sent_to, payload, _props)] = h.published
    assert sent_to == topic and json.loads(payload)["result"] == "done"


# --- floods and oversize input ------------------------------------------------------------------


def test_a_junk_flood_makes_five_records_five_replies_and_one_summary(h):
    for n in range(5000):  # all within one instant: the budget lets 20 through
        h.send(json.dumps({"junk": n}).encode())
    results = h.reports("command.result")
    assert [r["reason"] for r in results] == ["invalid"] * 5
    assert len(h.replies()) == 5
    stats = h.dl.stats()
    assert stats["cmd"] == {"received": 5000, "accepted": 20, "over_budget": 4980, "oversize": 0}
    assert stats["refused"] == {"invalid": 20}
    assert (stats["not_recorded"], stats["replies_withheld"]) == (15, 15)
    assert h.reports("alarm") == []  # the window is still open
    h.mono += 10
    h.dl.flush_flood()
    [summary] = h.reports("alarm")
    assert (summary["kind"], summary["active"]) == ("downlink_flood", True)
    counts = {name: flood_count(summary, name) for name in
              ("over_budget.cmd", "refused.invalid", "replies_withheld", "recorded")}
    assert counts == {"over_budget.cmd": 4980, "refused.invalid": 15, "replies_withheld": 15,
                      "recorded": 5}
    h.mono += 10
    h.dl.flush_flood()
    assert [(a["kind"], a["active"]) for a in h.reports("alarm")] == [("downlink_flood", True),
                                                                    ("downlink_flood", False)]
    assert len(h.reports("command.result")) == 5


def test_a_minute_of_5000_junk_commands_a_second_stays_under_100_records(h):
    """The issue's bound: 60 s at 5,000 messages a second, fewer than 100 records."""
    payload = json.dumps({"junk": 1}).encode()
    for _ in range(60 * 5000):
        h.mono += 1 / 5000
        h.dl.on_message(f"gate/v1/{SITE}/{GATE}/cmd", payload, PROPS)
    h.mono += 20
    h.dl.flush_flood()
    records = [e for e in h.events if isinstance(e, ev.Report)]
    assert len(records) < 100
    stats = h.dl.stats()
    assert stats["cmd"]["received"] == 300_000
    assert stats["cmd"]["accepted"] == pytest.approx(20 + 60 * 10, abs=2)  # burst + rate
    assert stats["refused"]["invalid"] == stats["cmd"]["accepted"]
    assert len(h.published) == len(h.reports("command.result")) <= 5 * 7
    flood = [r.fields for r in records if r.type == "alarm"]
    assert [a["active"] for a in flood] == [True] * (len(flood) - 1) + [False]


def test_refusals_of_signed_commands_are_still_recorded_during_a_junk_flood(h):
    h.send(command(counter=5, request_id="r-5"))
    for n in range(10):
        h.send(json.dumps({"junk": n}).encode())
    h.send(command(counter=5, request_id="r-5"))  # a replay of the server's own command
    assert h.reports("command.result")[-1] == {"request_id": "r-5", "command": "open",
                                               "result": "refused", "reason": "replayed"}
    assert h.dl.stats()["not_recorded"] == 5  # the junk past the first five


def test_a_command_over_64_kib_is_refused_unread(h):
    msg = command(request_id="r-big")
    payload = json.dumps(msg).encode() + b" " * (64 * 1024)  # valid JSON, signed, padded
    h.send(payload)
    assert_refused(h, "invalid", "")  # not read: no request id
    assert "65536" in h.replies()[0]["detail"]
    assert h.dl.stats()["cmd"]["oversize"] == 1


@pytest.mark.parametrize("depth", [40, 30_000])  # 30,000: under the 64 KiB cap
def test_a_deeply_nested_command_is_invalid_with_the_reason(h, depth):
    h.send(b'{"args": ' + b"[" * depth + b"]" * depth + b"}")
    assert_refused(h, "invalid")
    assert "nested" in h.replies()[0]["detail"]


# --- signing -----------------------------------------------------------------------------------


def test_the_contract_example_verifies_with_its_published_key():
    # docs/contract.md: the example command is signed with seed 0x00..0x1f.
    example = {"v": 1, "request_id": "r-20260901-0017", "site": "school-042", "gate": "main-1",
               "command": "open", "args": {"direction": "in"}, "nonce": "6f1c0a9e2b7d4c11",
               "counter": 1017, "issued_at": "2026-09-01T07:45:40Z",
               "expires": "2026-09-01T07:46:00Z", "key_id": "region-2026a",
               "sig": "ff6FDBRdEwUfaYL0d14VynXNpQlQH8blc2eEpVVQNtU3SSmKq0ebmJHxlwj3KTeVRDm7YYxeBtXVy2O7"
                      "RMCqBw=="}
    pub = public_key_b64(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    assert pub == "A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
    assert verify(example, {"region-2026a": pub}) == "region-2026a"
    # The same fields with other spacing and key order are the same signed bytes.
    reordered = json.loads(json.dumps(dict(reversed(list(example.items()))), indent=2))
    assert verify(reordered, {"region-2026a": pub}) == "region-2026a"
    example["counter"] = 1018
    with pytest.raises(SignatureError) as err:
        verify(example, {"region-2026a": pub})
    assert err.value.reason == "bad_signature"


def test_signed_commands_are_valid_against_the_contract_schema():
    assert validate("cmd", command("set_mode", {"mode": "free"})) == []


@pytest.mark.parametrize("field", ["expires", "issued_at"])
@pytest.mark.parametrize("text", ["2026-09-01T07:46:00", "2026-09-01T07:46:00.12a3Z", "2026-09-01",
                                  "2026-12-31T23:59:60Z"])
def test_a_time_without_offset_or_malformed_is_invalid_and_names_the_field(h, field, text):
    """The schema's date-time check refuses most; a leap second passes it but is no time
    the gate can compare (agent.core.records.parse_rfc3339), and the reply says the form."""
    h.send(command(**{field: text}))
    assert_refused(h, "invalid")
    detail = h.replies()[0]["detail"]
    assert field in detail
    if text.endswith(":60Z"):
        assert "is not an RFC 3339 time with an offset, e.g. \"2026-09-01T07:46:00Z\"" in detail


# --- through a real broker --------------------------------------------------------------------


from tests.broker import make_broker, wait_subscribed, wait_until  # noqa: F401  (fixture)


class _Outputs:
    def set(self, line, active):
        pass

    def feedback(self, reader, signal):
        pass


class _LiveGate:
    """A simulated gate wired like the service: Gate + GateRuntime + Journal + Uplink + Downlink."""

    def __init__(self, tmp_path, broker, fp, **dl_kw) -> None:
        from agent.downlink import uplink_publisher
        from agent.runtime import GateRuntime
        from agent.uplink.journal import Journal
        from agent.uplink.mqtt import Uplink

        self.journal = Journal(tmp_path / "journal.db")
        self.uplink = Uplink(self.journal, site=SITE, gate=GATE, host=broker.host, port=broker.port,
                             ack_mode="broker", backoff_min_s=0.1, backoff_max_s=0.5)
        holder: list = []
        self.dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path / "state",
                           submit=lambda e: holder[0].submit(e), publish=uplink_publisher(self.uplink),
                           trusted_keys={KEY_ID: PUB}, **dl_kw)
        self.gate = Gate(GateConfig(site=SITE, gate=GATE), fp, None)
        self.records: list[dict] = []
        self.rt = GateRuntime(self.gate, self.journal, outputs=_Outputs(),
                              on_record=lambda r: (self.records.append(r), self.dl.on_record(r),
                                                   self.uplink.wake()))
        holder.append(self.rt)
        self.uplink.on_message = self.dl.on_message
        self.rt.start()
        self.uplink.start()
        wait_subscribed(self.uplink, broker)  # a command sent sooner could find nobody listening

    def close(self) -> None:
        self.uplink.stop()
        self.rt.stop()
        self.dl.close()
        self.journal.close()


@pytest.fixture
def live_gate(tmp_path, make_broker, fp):
    broker = make_broker()
    live = _LiveGate(tmp_path, broker, fp)
    yield broker, live.gate, tmp_path
    live.close()


def test_a_retained_command_on_the_broker_is_refused_through_the_real_uplink(tmp_path, make_broker, fp):
    """The broker hands a retained message to a new subscriber with the retain flag
    set: the gate must refuse it (esp-rfid's users found out why)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    broker = make_broker()
    msg = command("open", counter=int(time.time() * 1000), now=time.time())
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = 20
    props.ResponseTopic = REPLY
    props.CorrelationData = CORR
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    pub.publish(f"gate/v1/{SITE}/{GATE}/cmd", json.dumps(msg), qos=1, retain=True,
                properties=props).wait_for_publish(5)
    pub.loop_stop()
    pub.disconnect()

    live = _LiveGate(tmp_path, broker, fp)
    try:
        deadline = time.monotonic() + 10
        while not [r for r in live.records if r["type"] == "command.result"]:
            assert time.monotonic() < deadline, "no command.result for the retained command"
            time.sleep(0.02)
        result = next(r for r in live.records if r["type"] == "command.result")
        assert result["result"] == "refused" and result["reason"] == "invalid"
        assert live.gate.pending is None, "a retained open must never open the gate"
    finally:
        live.close()


def run_tool(argv: list[str]) -> tuple[int, str, str]:
    from agent.regional.tools import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def write_key(tmp_path: Path) -> Path:
    from agent.downlink.signing import private_key_pem

    path = tmp_path / "region.key"
    path.write_bytes(private_key_pem(KEY))
    return path


def test_cmd_tool_gets_the_reply_through_mosquitto(live_gate):
    broker, gate, tmp_path = live_gate
    key = write_key(tmp_path)
    conn = ["--site", SITE, "--gate", GATE, "--host", broker.host, "--port", str(broker.port),
            "--key-id", KEY_ID, "--timeout", "10"]
    code, out, err = run_tool(["cmd", "set_mode", "lockdown", *conn, "--key", str(key)])
    assert code == 0, err
    reply = json.loads(out)
    assert (reply["command"], reply["result"]) == ("set_mode", "done")
    assert gate.mode == "lockdown"
    # The same tool with a key the gate does not trust: refused, exit 1, the reason printed.
    from agent.downlink.signing import private_key_pem

    forged = tmp_path / "forged.key"
    forged.write_bytes(private_key_pem(OTHER_KEY))
    code, out, err = run_tool(["cmd", "open", "in", *conn, "--key", str(forged)])
    assert code == 1, err
    assert json.loads(out)["reason"] == "bad_signature"
    assert gate.pending is None


def test_reply_carries_the_correlation_data_on_the_response_topic(live_gate):
    from agent.regional.tools import Session, send_command

    broker, _gate, _ = live_gate
    session = Session(broker.host, broker.port)
    try:
        code, reply, note = send_command(
            session, site=SITE, gate=GATE, command="status", args={}, key=KEY, key_id=KEY_ID,
            counter=int(time.time() * 1000), ttl_s=20, timeout=10)
        assert code == 0, note
        assert reply["data"]["site"] == SITE
        replies = [m for m in session.messages if "/reply/" in m.topic]
        assert len(replies) == 1
        assert isinstance(replies[0].properties.CorrelationData, bytes)
        assert len(replies[0].properties.CorrelationData) == 16
    finally:
        session.close()


def test_cmd_tool_exits_3_when_the_gate_is_not_subscribed(make_broker, tmp_path):
    broker = make_broker()
    key = write_key(tmp_path)
    code, _out, err = run_tool(["cmd", "open", "in", "--site", SITE, "--gate", "nobody", "--host",
                                broker.host, "--port", str(broker.port), "--key", str(key),
                                "--key-id", KEY_ID, "--timeout", "2"])
    assert code == 3
    assert "offline" in err


def test_trusted_keys_load_from_base64_pem_or_a_file(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from agent.downlink.signing import KeyLoadError, load_trusted_keys

    pem = KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    pub_file = tmp_path / "region.key.pub"
    pub_file.write_text(PUB + "\n")
    keys = load_trusted_keys({"a": PUB, "b": pem, "c": str(pub_file)})
    for key_id in "abc":
        assert verify(command(key_id=key_id), keys) == key_id
    with pytest.raises(KeyLoadError, match="'bad'.*base64"):
        load_trusted_keys({"bad": "not a key"})
    with pytest.raises(KeyLoadError, match="32"):
        load_trusted_keys({"short": "AAAA"})


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    from agent.downlink.signing import load_private_key, public_key_b64

    out = tmp_path / "region.key"
    code, printed, _ = run_tool(["keygen", str(out), "--key-id", "region-2027a"])
    assert code == 0
    assert out.stat().st_mode & 0o777 == 0o600
    assert public_key_b64(load_private_key(out)) == printed.strip()
    assert run_tool(["keygen", str(out)])[0] == 2  # never overwritten by accident


def test_a_poisoned_command_never_stops_the_uplink(tmp_path, make_broker, fp):
    """A lone surrogate in a command's request id (valid JSON, not valid UTF-8) must not
    make a record the uplink cannot send: every later event still reaches the broker."""
    import paho.mqtt.client as mqtt

    broker = make_broker()
    live = _LiveGate(tmp_path, broker, fp)
    try:
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        pub.publish(f"gate/v1/{SITE}/{GATE}/cmd", b'{"request_id":"\\ud800","command":"open\\udfff"}',
                    qos=1).wait_for_publish(5)
        pub.loop_stop()
        pub.disconnect()
        deadline = time.monotonic() + 10
        while not [r for r in live.records if r["type"] == "command.result"]:
            assert time.monotonic() < deadline, "the poisoned command got no command.result"
            time.sleep(0.02)
        live.rt.submit(ev.Report("alarm", {"kind": "tamper", "active": True}))
        while live.journal.backlog() or not [r for r in live.records if r["type"] == "alarm"]:
            assert time.monotonic() < deadline + 10, (
                f"the uplink stopped: backlog {live.journal.backlog()}, {live.uplink.stats()}")
            time.sleep(0.05)
        result = next(r for r in live.records if r["type"] == "command.result")
        assert result["result"] == "refused"
    finally:
        live.close()


def test_a_base64_public_key_starting_with_a_slash_is_a_key_not_a_path():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.downlink.signing import load_public_key

    raw = bytes([0xFD]) + bytes(31)  # base64 of a first byte 0xFD begins with "/"
    text = base64.b64encode(raw).decode()
    assert text.startswith("/")
    key = load_public_key(text)
    assert isinstance(key, Ed25519PublicKey)


def flood_count(alarm: dict, name: str) -> int:
    """The count ``name=N`` in a downlink_flood alarm's detail (docs/contract.md), 0 if absent."""
    found = re.search(rf"(?:^|\s){re.escape(name)}=(\d+)", alarm["detail"])
    return int(found.group(1)) if found else 0


def _wait_stable(read, *, settle_s: float = 1.0, timeout_s: float = 60.0):
    """read() once it has stopped changing for settle_s."""
    last, since = read(), time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() - since < settle_s:
        assert time.monotonic() < deadline, f"still changing after {timeout_s} s: {last}"
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_5000_junk_commands_through_mosquitto_make_a_bounded_number_of_records(tmp_path, make_broker, fp):
    """Finding 1 through the real parts: mosquitto, the Uplink, the Downlink, the runtime and
    the journal. 5,000 junk commands (QoS 0, each asking for a reply) give a handful of
    records and replies and one summary; cards are still decided; the server's next signed
    command still gets its answer."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from agent.regional.tools import Session, send_command

    broker = make_broker()
    live = _LiveGate(tmp_path, broker, fp)
    replies: list = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: replies.append(m.topic)
    suback = threading.Event()
    sub.on_subscribe = lambda *_: suback.set()
    sub.connect(broker.host, broker.port)
    sub.subscribe(f"gate/v1/{SITE}/{GATE}/reply/#", qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        # The replies' listener is in place before the flood asks for any; QoS 0 publishes
        # are dropped by paho until its CONNACK came.
        assert suback.wait(10), "the replies' subscription was not acknowledged"
        wait_until(pub.is_connected, 10, "the flooding client's CONNACK")
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = 20
        props.ResponseTopic = REPLY
        props.CorrelationData = CORR
        for n in range(5000):
            pub.publish(f"gate/v1/{SITE}/{GATE}/cmd", json.dumps({"junk": n}), qos=0, properties=props)
            if n % 1000 == 999:  # a card read in the middle of the flood
                live.rt.submit(ev.CardRead("entry", 1000 + n))
        _wait_stable(lambda: len(live.records))
        results = [r for r in live.records if r["type"] == "command.result"]
        assert len(results) < 50, f"{len(results)} command.result records from the flood"
        received = _wait_stable(lambda: live.dl.stats()["cmd"]["received"])
        live.dl.close()  # records what the open flood window counted
        assert live.rt.wait_idle(10)

        results = [r for r in live.records if r["type"] == "command.result"]
        floods = [r for r in live.records if r["type"] == "alarm" and r["kind"] == "downlink_flood"]
        assert floods and all(f["active"] for f in floods)
        assert len(results) <= 5 * len(floods)
        stats = live.dl.stats()
        assert received >= 1000, "the broker delivered too little of the flood to test anything"
        cmd = stats["cmd"]
        assert cmd["received"] == cmd["accepted"] + cmd["over_budget"] + cmd["oversize"] == received
        assert stats["refused"] == {"invalid": cmd["accepted"]}
        # The summaries count exactly what was not recorded one by one.
        counted = sum(flood_count(f, "refused.invalid") for f in floods)
        over = sum(flood_count(f, "over_budget.cmd") for f in floods)
        assert counted + len(results) == cmd["accepted"]
        assert over == cmd["over_budget"]
        decided = [r for r in live.records if r["type"] == "access.denied"]
        assert len(decided) == 5  # every card read decided (unknown: no list)
        _wait_stable(lambda: len(replies), settle_s=0.5)
        assert len(replies) == len(results)

        # A second of quiet (above) refilled the command budget: the server is heard again.
        session = Session(broker.host, broker.port)
        try:
            code, reply, note = send_command(
                session, site=SITE, gate=GATE, command="status", args={}, key=KEY, key_id=KEY_ID,
                counter=int(time.time() * 1000), ttl_s=20, timeout=10)
        finally:
            session.close()
        assert code == 0, note
        assert reply["result"] == "done"
    finally:
        pub.loop_stop()
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
        live.close()
