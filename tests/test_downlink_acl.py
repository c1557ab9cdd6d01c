"""Access lists over MQTT: a snapshot then a delta change who a real gate lets
in, the gate keeps deciding on the old list while the new one builds, the
applied list survives a restart, a wrong base asks for a snapshot, a bad list
keeps the old one, an old list is flagged stale, and only signed lists for
this gate are taken. The last test pushes a signed delta with
`gate-agent acl push` through mosquitto (mutual TLS) to a simulated gate.
"""
from __future__ import annotations

import copy
import io
import json
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.contract import validate
from agent.core import events as ev
from agent.core.cards import parse_card_string
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.downlink import Downlink
from agent.downlink.aclfiles import ACL_FILE
from agent.downlink.signing import generate_keypair, private_key_pem, sign_acl
from agent.runtime import Clock, GateRuntime
from bench.synthetic import synthetic_acl
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

ROOT = Path(__file__).resolve().parent.parent
SCHOOL = json.loads((ROOT / "examples" / "acl" / "school.json").read_text())
SITE, GATE = "school-17", "main"
KEY, PUB = generate_keypair()
OTHER_KEY, _ = generate_keypair()
KEY_ID = "region-2026a"
# Tuesday 2026-09-01 08:00 in Asia/Tomsk (UTC+7): juniors and staff may enter.
SCHOOL_TIME = datetime(2026, 9, 1, 1, 0, tzinfo=UTC).timestamp()
PUPIL = parse_card_string("100,60179", 24)  # p-0001, junior
NEWCOMER_CARD = "100,1"  # in no list until the delta adds p-9001
NEWCOMER = parse_card_string(NEWCOMER_CARD, 24)
ACL_TOPIC = f"gate/v1/{SITE}/{GATE}/acl"

DELTA = {
    "kind": "delta", "version": "2026-09-02.1", "base": SCHOOL["version"],
    "people": [{"id": "p-9001", "cards": [NEWCOMER_CARD], "groups": ["staff"]}],
    "block": ["100,60179"],  # p-0001 lost the card
}

_counter = [0]


def signed(doc: dict, *, key=KEY, site: str = SITE, gate: str | None = GATE, counter: int | None = None) -> bytes:
    if counter is None:
        _counter[0] += 1
        counter = _counter[0] + 1_000
    return json.dumps(sign_acl(key, doc, key_id=KEY_ID, site=site, gate=gate, counter=counter)).encode()


class Outputs:
    def set(self, line, active):
        pass

    def feedback(self, reader, signal):
        pass


class LiveGate:
    """A real Gate on a GateRuntime (its own thread) with a Downlink feeding it lists."""

    def __init__(self, state_dir: Path, fp, *, from_disk: bool = False, wall=lambda: SCHOOL_TIME,
                 **dl_kw) -> None:
        self.sink = SequenceSink("j")
        self.records: list[dict] = []
        self.lock = threading.Lock()
        holder: list[GateRuntime] = []
        dl_kw.setdefault("trusted_keys", {KEY_ID: PUB})
        self.dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=state_dir,
                           submit=lambda e: holder[0].submit(e), publish=lambda *a: None,
                           wall=wall, **dl_kw)
        # As the service starts: the stored list first, before any broker.
        table = self.dl.load_persisted()[1] if from_disk else None
        self.gate = Gate(GateConfig(site=SITE, gate=GATE, timezone="Asia/Tomsk"), fp, table, boot="b-1")
        # Virtual monotonic time, moved on before each input: relay pulses and the
        # lane's rest end between two cards whatever the machine's speed.
        self.mono = 1000.0
        self.rt = GateRuntime(self.gate, self.sink, outputs=Outputs(), on_record=self._on_record,
                              clock=Clock(monotonic=lambda: self.mono, wall=lambda: SCHOOL_TIME))
        holder.append(self.rt)

    def start(self) -> LiveGate:
        self.rt.start()
        return self

    def _on_record(self, rec: dict) -> None:
        assert validate("event", rec) == [], rec
        with self.lock:
            self.records.append(rec)
        self.dl.on_record(rec)

    def push(self, payload: bytes) -> None:
        self.dl.on_message(ACL_TOPIC, payload, None)
        assert self.dl.wait_idle(30)
        assert self.rt.wait_idle(10)

    def card(self, key: int) -> dict:
        """Present a card at the entry reader; the decision record. A grant is walked through."""
        n = len(self.all())
        self.mono += 1.0
        self.rt.submit(ev.CardRead("entry", key))
        assert self.rt.wait_idle(10)
        decision = next(r for r in self.all()[n:] if r["type"].startswith("access."))
        if decision["type"] == "access.granted":
            self.mono += 1.0
            self.rt.submit(ev.PassSensor("A"))
            assert self.rt.wait_idle(10)
        return decision

    def all(self, rtype: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.records if rtype is None or r["type"] == rtype]

    def stop(self) -> None:
        self.rt.stop()
        self.dl.close()


@pytest.fixture
def live(tmp_path, fp):
    made: list[LiveGate] = []

    def make(**kw) -> LiveGate:
        g = LiveGate(tmp_path / "state", fp, **kw).start()
        made.append(g)
        return g

    yield make
    for g in made:
        g.stop()


def test_snapshot_then_delta_change_who_the_gate_lets_in(live):
    g = live()
    assert g.card(PUPIL)["reason"] == "unknown_card"  # a new board: no list yet
    g.push(signed(SCHOOL))
    [applied] = g.all("acl.applied")
    assert (applied["version"], applied["kind"], applied["base"]) == (SCHOOL["version"], "snapshot", None)
    assert g.card(PUPIL)["type"] == "access.granted"
    assert g.card(NEWCOMER)["reason"] == "unknown_card"
    g.push(signed(DELTA))
    applied = g.all("acl.applied")[-1]
    assert (applied["version"], applied["kind"], applied["base"]) == (DELTA["version"], "delta", SCHOOL["version"])
    assert g.card(PUPIL)["reason"] == "blocked"
    granted = g.card(NEWCOMER)
    assert (granted["type"], granted["person"]) == ("access.granted", "p-9001")
    assert g.dl.status()["acl_version"] == DELTA["version"]


def test_the_gate_decides_on_the_old_list_while_the_new_one_builds(live):
    g = live()
    g.push(signed(SCHOOL))
    entered, release = threading.Event(), threading.Event()
    real_builder = g.dl.acl._builder

    def slow_builder(acl, fp):
        entered.set()
        assert release.wait(30), "test never released the build"
        return real_builder(acl, fp)

    g.dl.acl._builder = slow_builder
    g.dl.on_message(ACL_TOPIC, signed(DELTA), None)  # returns at once: the worker builds
    assert entered.wait(10)
    # The build is held open: the gate thread keeps deciding, on the old list.
    decisions = [g.card(PUPIL) for _ in range(3)]
    assert [d["type"] for d in decisions] == ["access.granted"] * 3
    assert [r["version"] for r in g.all("acl.applied")] == [SCHOOL["version"]]
    release.set()
    assert g.dl.wait_idle(10) and g.rt.wait_idle(10)
    assert g.all("acl.applied")[-1]["version"] == DELTA["version"]
    assert g.card(PUPIL)["reason"] == "blocked"


def test_a_large_list_swaps_in_between_decisions(live):
    g = live()
    g.push(signed(SCHOOL))
    big = synthetic_acl(20_000, version="big.1")
    first_big_card = parse_card_string(big["people"][0]["cards"][0], 24)
    # As agent.mqttclient hands a big message over: the bytearray paho read it into.
    g.dl.on_message(ACL_TOPIC, bytearray(signed(big)), None)
    # Decide while it builds, until it is in; every decision uses one whole list or the other.
    outcomes = []
    deadline = time.monotonic() + 30
    while not any(r["version"] == "big.1" for r in g.all("acl.applied")):
        assert time.monotonic() < deadline, "the large list was never applied"
        outcomes.append(g.card(PUPIL))
    g.dl.wait_idle(10)
    order = [r for r in g.all() if r["type"] in ("access.granted", "access.denied", "acl.applied")]
    swap = next(i for i, r in enumerate(order) if r["type"] == "acl.applied" and r["version"] == "big.1")
    assert all(r["type"] == "access.granted" for r in order[1:swap])  # old list: p-0001 in
    assert all(r["reason"] == "unknown_card" for r in order[swap + 1:])  # new list: p-0001 unknown
    assert len(outcomes) == len(order) - 2  # each card decided once, the two swaps aside
    assert g.card(first_big_card)["type"] == "access.granted"


def test_the_applied_list_is_kept_on_disk_and_loaded_at_the_next_start(tmp_path, live, fp):
    g = live()
    g.push(signed(SCHOOL))
    g.push(signed(DELTA))
    g.stop()
    stored = tmp_path / "state" / ACL_FILE  # the binary image (acl.bin)
    assert stored.stat().st_mode & 0o777 == 0o600
    # Next start, broker unreachable: the list comes from disk before anything else.
    events: list = []
    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path / "state", submit=events.append,
                  publish=lambda *a: None, trusted_keys={KEY_ID: PUB}, acl_async=False)
    acl, table = dl.load_persisted()
    assert acl.version == table.version == DELTA["version"]
    assert events == []
    g2 = live(from_disk=True)
    assert g2.all("agent.started")[0]["acl_version"] == DELTA["version"]
    assert g2.card(PUPIL)["reason"] == "blocked"
    assert g2.card(NEWCOMER)["type"] == "access.granted"
    # A delta against the stored version applies at once.
    more = {"kind": "delta", "version": "2026-09-03.1", "base": DELTA["version"], "unblock": ["100,60179"]}
    g2.push(signed(more))
    assert g2.all("acl.applied")[-1]["version"] == "2026-09-03.1"
    assert g2.card(PUPIL)["type"] == "access.granted"


def test_a_damaged_stored_list_is_moved_aside_and_reported(tmp_path, fp):
    state = tmp_path / "state"
    state.mkdir()
    (state / "acl.json").write_text('{"format": 1, "list": {"kind": "snap')
    events: list = []
    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=state, submit=events.append,
                  publish=lambda *a: None, trusted_keys={KEY_ID: PUB}, acl_async=False)
    assert dl.load_persisted() == (None, None)
    assert not (state / "acl.json").exists()
    assert len(list(state.glob("acl.json.corrupt-*"))) == 1
    [alarm] = [e.fields for e in events if isinstance(e, ev.Report)]
    assert (alarm["kind"], alarm["active"]) == ("acl_corrupt", True)
    dl.on_message(ACL_TOPIC, signed(SCHOOL), None)
    assert [e.fields for e in events if isinstance(e, ev.Report)][-1] == {
        "kind": "acl_corrupt", "active": False, "detail": events[-1].fields["detail"]}


@pytest.mark.parametrize("refusal", ["raises", "returns False"])
def test_a_report_made_before_the_runtime_exists_is_not_lost(tmp_path, fp, refusal):
    state = tmp_path / "state"
    state.mkdir()
    (state / "acl.json").write_text("garbage")
    runtime: list = []
    events: list = []

    def submit(event):
        if runtime:
            events.append(event)
            return True
        if refusal == "raises":
            raise NameError("runtime")
        return False

    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=state, submit=submit,
                  publish=lambda *a: None, trusted_keys={KEY_ID: PUB}, acl_async=False)
    dl.load_persisted()  # the runtime is not built yet
    # An action the gate could not take is dropped, never carried out later.
    from agent.downlink.signing import make_command, sign_command

    cmd = sign_command(KEY, make_command(SITE, GATE, "open", {"direction": "in"}, key_id=KEY_ID,
                                         counter=1, now=time.time()))
    dl.on_message(f"gate/v1/{SITE}/{GATE}/cmd", json.dumps(cmd).encode(), None)
    runtime.append(True)
    dl.status()  # any later call hands the report over
    assert [type(e).__name__ for e in events] == ["Report"]
    assert events[0].fields["kind"] == "acl_corrupt"


def test_a_delta_against_the_wrong_base_asks_for_a_snapshot(live):
    g = live()
    g.push(signed(DELTA))  # no list yet
    [rej] = g.all("acl.rejected")
    assert (rej["version"], rej["code"]) == (DELTA["version"], "base_mismatch")
    assert g.all("acl.requested")[-1] == {**g.all("acl.requested")[-1], "reason": "base_mismatch",
                                          "have": None}
    g.push(signed(SCHOOL))
    wrong = {**DELTA, "base": "2026-08-31.9", "version": "2026-09-02.2"}
    g.push(signed(wrong))
    rej = g.all("acl.rejected")[-1]
    assert rej["code"] == "base_mismatch" and rej["errors"]
    req = g.all("acl.requested")[-1]
    assert (req["reason"], req["have"]) == ("base_mismatch", SCHOOL["version"])
    assert g.card(PUPIL)["type"] == "access.granted"  # still the old list


def test_an_invalid_list_is_rejected_with_reasons_and_the_old_one_stays(live):
    g = live()
    g.push(signed(SCHOOL))
    bad = copy.deepcopy(SCHOOL)
    bad["version"] = "2026-09-02.bad"
    bad["people"][0]["cards"] = ["12,abc"]
    bad["people"][1]["name"] = "Ivan Petrov"  # the list has no place for names
    g.push(signed(bad))
    [rej] = g.all("acl.rejected")
    assert (rej["version"], rej["code"]) == ("2026-09-02.bad", "invalid")
    paths = {e["path"] for e in rej["errors"]}
    assert "/people/0/cards/0" in paths and any(p.startswith("/people/1") for p in paths)
    assert [r["version"] for r in g.all("acl.applied")] == [SCHOOL["version"]]
    assert g.card(PUPIL)["type"] == "access.granted"
    assert g.dl.status()["acl_version"] == SCHOOL["version"]


def test_an_old_list_is_flagged_stale_once(live):
    wall = [SCHOOL_TIME]
    g = live(wall=lambda: wall[0], acl_max_age_s=3600)
    g.push(signed(SCHOOL))
    assert g.dl.status() == {"acl_version": SCHOOL["version"], "acl_age_s": 0.0, "acl_stale": False}
    wall[0] += 3601
    status = g.dl.status()
    assert status["acl_stale"] is True and status["acl_age_s"] == pytest.approx(3601, abs=1)
    g.dl.status()
    g.rt.wait_idle(10)
    alarms = [r for r in g.all("alarm") if r["kind"] == "acl_stale"]
    assert [a["active"] for a in alarms] == [True]  # once, not per status call
    assert g.all("acl.requested")[-1]["reason"] == "stale"
    assert g.card(PUPIL)["type"] == "access.granted"  # the gate keeps using it
    g.push(signed(SCHOOL))  # the server answers with the same version, signed anew
    assert g.dl.status()["acl_stale"] is False
    g.rt.wait_idle(10)
    assert [a["active"] for a in g.all("alarm") if a["kind"] == "acl_stale"] == [True, False]


# --- signatures and addressing ------------------------------------------------------------


def rejected_after(g: LiveGate, payload: bytes) -> dict:
    n = len(g.all("acl.rejected"))
    g.push(payload)
    rejected = g.all("acl.rejected")[n:]
    assert len(rejected) == 1, g.all()
    return rejected[0]


def test_only_signed_lists_for_this_gate_are_taken(live):
    g = live()
    assert "unsigned" in rejected_after(g, json.dumps(SCHOOL).encode())["errors"][0]["message"]
    assert rejected_after(g, signed(SCHOOL, key=OTHER_KEY))["errors"][0]["path"] == "/sig"
    assert "misaddressed" in rejected_after(g, signed(SCHOOL, site="school-18"))["errors"][0]["message"]
    assert "misaddressed" in rejected_after(g, signed(SCHOOL, gate="side"))["errors"][0]["message"]
    tampered = json.loads(signed(SCHOOL))
    tampered["list"]["blocked"] = []  # un-block the lost cards without the key
    assert rejected_after(g, json.dumps(tampered).encode())["errors"][0]["path"] == "/sig"
    assert g.all("acl.applied") == []
    g.push(signed(SCHOOL, gate=None))  # a list for every gate of the site
    assert len(g.all("acl.applied")) == 1


def test_an_old_signed_list_cannot_be_replayed_to_roll_the_gate_back(live):
    g = live()
    old = signed(SCHOOL, counter=10)
    g.push(old)
    g.push(signed(DELTA, counter=11))
    rej = rejected_after(g, old)
    assert rej["errors"][0]["path"] == "/counter"
    assert g.card(PUPIL)["reason"] == "blocked"  # still the delta's list


def test_a_redelivered_list_is_ignored_without_a_rejection(live):
    g = live()
    g.push(signed(SCHOOL, counter=20))
    delta = signed(DELTA, counter=21)
    g.push(delta)
    g.push(delta)  # QoS 1 delivered it twice
    assert g.all("acl.rejected") == []
    assert [r["version"] for r in g.all("acl.applied")] == [SCHOOL["version"], DELTA["version"]]


def test_a_lab_gate_takes_unsigned_lists(live):
    g = live(allow_unsigned=True)
    g.push(json.dumps(SCHOOL).encode())
    assert [r["version"] for r in g.all("acl.applied")] == [SCHOOL["version"]]


def test_a_retained_list_is_ignored(live):
    g = live()
    g.dl.on_message(ACL_TOPIC, signed(SCHOOL), {"retain": True})
    g.dl.wait_idle(10)
    g.rt.wait_idle(10)
    assert g.all("acl.applied") == [] and g.all("acl.rejected") == []


# --- hostile input: nesting, size, floods, issued_at ---------------------------------------------


@pytest.mark.parametrize("depth", [300, 100_000])
def test_a_deeply_nested_list_is_rejected_with_the_reason(live, depth):
    g = live()
    g.push(signed(SCHOOL))
    rej = rejected_after(g, b'{"kind": "snapshot", "version": "deep", "people": ' + b"[" * depth
                         + b"]" * depth + b"}")
    assert rej["code"] == "invalid" and "nested" in rej["errors"][0]["message"]
    assert g.card(PUPIL)["type"] == "access.granted"  # the gate kept its list


def test_a_signed_list_nested_deeper_than_the_validator_goes_is_rejected(live):
    """Signed by the server's key and 300 deep (the schema validator stops at 255):
    refused as too deep, never an exception nobody records."""
    g = live()
    g.push(signed(SCHOOL))
    inner = json.loads(signed(SCHOOL))
    inner["list"]["people"] = json.loads("[" * 300 + "]" * 300)
    from agent.downlink.signing import sign_message

    envelope = sign_message(KEY, {k: v for k, v in inner.items() if k != "sig"})
    rej = rejected_after(g, json.dumps(envelope).encode())
    assert "nested" in rej["errors"][0]["message"]
    assert g.card(PUPIL)["type"] == "access.granted"  # the gate kept its list


def test_a_list_over_the_size_cap_is_refused_unread(live, monkeypatch):
    from agent.downlink import acl_sync

    parsed: list = []
    real_parse = acl_sync.parse_acl_json
    monkeypatch.setattr(acl_sync, "parse_acl_json", lambda data: parsed.append(1) or real_parse(data))
    g = live(max_list_bytes=4096)
    payload = signed(SCHOOL)
    assert len(payload) > 4096
    rej = rejected_after(g, payload)
    assert str(len(payload)) in rej["errors"][0]["message"] and "4096" in rej["errors"][0]["message"]
    assert parsed == []
    assert g.dl.stats()["acl"]["oversize"] == 1
    assert g.all("acl.applied") == []


def test_the_list_size_cap_is_a_config_setting_sized_for_a_million_cards():
    from agent.config import ConfigError, parse_config

    base = {"site": {"id": SITE, "gate": GATE}, "hardware": {"pin_factory": "mock"}}
    cfg = parse_config(base)
    assert cfg.acl.max_list_mb == 128
    assert cfg.acl.max_list_bytes > 76_000_000  # synthetic_acl(1_000_000): about 75 MB
    assert parse_config({**base, "acl": {"max_list_mb": 8}}).acl.max_list_bytes == 8 << 20
    with pytest.raises(ConfigError, match="max_list_mb"):
        parse_config({**base, "acl": {"max_list_mb": 0}})


def test_a_redelivered_list_is_not_parsed_again(live, monkeypatch):
    from agent.downlink import acl_sync

    parsed: list = []
    real_parse = acl_sync.parse_acl_json
    monkeypatch.setattr(acl_sync, "parse_acl_json", lambda data: parsed.append(1) or real_parse(data))
    g = live()
    payload = signed(SCHOOL)
    g.push(payload)
    g.push(payload)
    assert len(parsed) == 1 and len(g.all("acl.applied")) == 1


def test_a_junk_flood_on_the_acl_topic_makes_a_bounded_number_of_records(live):
    g = live()
    for n in range(1000):
        g.dl.on_message(ACL_TOPIC, json.dumps({"junk": n}).encode(), None)
    assert g.dl.wait_idle(30)
    g.dl.close()  # records what the open window counted
    assert g.rt.wait_idle(10)
    rejected = g.all("acl.rejected")
    assert 1 <= len(rejected) <= 5
    stats = g.dl.stats()
    assert stats["acl"]["received"] == 1000
    assert stats["acl"]["over_budget"] >= 1000 - 20  # a burst of 10, 2 a second
    [summary] = [a for a in g.all("alarm") if a["kind"] == "downlink_flood"]
    assert f"over_budget.acl={stats['acl']['over_budget']}" in summary["detail"]
    assert len(rejected) + stats["not_recorded"] == stats["acl"]["accepted"]


def test_lists_beyond_what_the_worker_can_hold_are_refused_not_queued(live):
    g = live()
    g.push(signed(SCHOOL))
    entered, release = threading.Event(), threading.Event()
    real_builder = g.dl.acl._builder

    def slow_builder(acl, fp):
        entered.set()
        assert release.wait(30), "test never released the build"
        return real_builder(acl, fp)

    g.dl.acl._builder = slow_builder
    g.dl.on_message(ACL_TOPIC, signed(DELTA), None)
    assert entered.wait(10)
    for n in range(6):
        g.dl.on_message(ACL_TOPIC, signed({**SCHOOL, "version": f"2026-09-03.{n}"}), None)
    release.set()
    assert g.dl.wait_idle(30) and g.rt.wait_idle(10)
    # One building, three waiting, three refused.
    assert [r["errors"][0]["message"][:8] for r in g.all("acl.rejected")] == ["not read"] * 3
    assert g.dl.stats()["acl"]["queue_full"] == 3


def test_a_signed_lists_issued_at_raises_the_time_floor(live, tmp_path):
    g = live()
    envelope = sign_acl(KEY, SCHOOL, key_id=KEY_ID, site=SITE, gate=GATE, counter=5000,
                        issued_at=SCHOOL_TIME - 30)
    g.push(json.dumps(envelope).encode())
    assert [r["version"] for r in g.all("acl.applied")] == [SCHOOL["version"]]
    assert g.dl.wall_floor() == pytest.approx(SCHOOL_TIME - 30, abs=5)
    stored = json.loads((tmp_path / "state" / "counters.json").read_text())
    assert stored["floor"] == pytest.approx(SCHOOL_TIME - 30, abs=5)


def test_a_list_issued_far_ahead_of_a_synchronised_clock_is_refused(live):
    g = live()
    envelope = sign_acl(KEY, SCHOOL, key_id=KEY_ID, site=SITE, gate=GATE, counter=5001,
                        issued_at=SCHOOL_TIME + 86400)
    rej = rejected_after(g, json.dumps(envelope).encode())
    assert rej["errors"][0]["path"] == "/issued_at"
    assert "ahead of this gate's synchronised clock" in rej["errors"][0]["message"]
    assert g.all("acl.applied") == [] and g.dl.wall_floor() == 0.0


# --- end to end: gate-agent acl push through mosquitto with mutual TLS ----------------------------

from tests.broker import wait_subscribed
from tests.pki import GATE_A, gate_broker, pki, tls_context  # noqa: F401  (fixtures)
from tests.pki import SITE as PKI_SITE


def run_tool(argv: list[str]) -> tuple[int, str, str]:
    from agent.regional.tools import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("form", ["json", "compact"])
def test_a_signed_delta_pushed_with_acl_push_changes_who_the_simulated_gate_lets_in(
        gate_broker, pki, tmp_path, fp, form):  # noqa: F811
    from agent.downlink import uplink_publisher
    from agent.uplink.journal import Journal
    from agent.uplink.mqtt import Uplink

    assert (PKI_SITE, GATE_A) == (SITE, GATE)
    journal = Journal(tmp_path / "journal.db")
    uplink = Uplink(journal, site=SITE, gate=GATE, host=gate_broker.host, port=gate_broker.port,
                    tls=pki.gate_a.tls(pki.ca_file), ack_mode="broker", backoff_min_s=0.1,
                    backoff_max_s=0.5)
    # The simulated gate: the service's wiring with the journal as sink.
    holder: list[GateRuntime] = []
    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path / "state",
                  submit=lambda e: holder[0].submit(e), publish=uplink_publisher(uplink),
                  trusted_keys={KEY_ID: PUB})
    gate = Gate(GateConfig(site=SITE, gate=GATE, timezone="Asia/Tomsk"), fp, None, boot="b-1")
    decided: list[dict] = []
    mono = [1000.0]
    rt = GateRuntime(gate, journal, outputs=Outputs(),
                     clock=Clock(monotonic=lambda: mono[0], wall=lambda: SCHOOL_TIME),
                     on_record=lambda r: (dl.on_record(r), uplink.wake(), decided.append(r)))
    holder.append(rt)
    uplink.on_message = dl.on_message
    rt.start()
    uplink.start()
    try:
        # Connected with its certificate, and subscribed: a list pushed sooner could find
        # nobody listening. The regional server may read the gate's status, on its listener.
        wait_subscribed(uplink, gate_broker, port=gate_broker.services_port,
                        tls=tls_context(pki.regional, pki.ca_file))

        key = tmp_path / "region.key"
        key.write_bytes(private_key_pem(KEY))
        snapshot, delta = tmp_path / "school.json", tmp_path / "delta.json"
        snapshot.write_text(json.dumps(SCHOOL))
        delta.write_text(json.dumps(DELTA))
        def conn(identity, wait: str = "20") -> list[str]:
            # The regional services have their own listener (docs/security.md).
            port = gate_broker.port if "/" in identity.name else gate_broker.services_port
            return ["--site", SITE, "--gate", GATE, "--host", gate_broker.host, "--port",
                    str(port), "--tls-ca", str(pki.ca_file), "--tls-cert",
                    str(identity.cert), "--tls-key", str(identity.key),
                    "--key", str(key), "--key-id", KEY_ID, "--wait", wait]

        def decide(card: int) -> dict:
            n = len(decided)
            mono[0] += 1.0
            rt.submit(ev.CardRead("entry", card))
            assert rt.wait_idle(10)
            d = next(r for r in decided[n:] if r["type"].startswith("access."))
            if d["type"] == "access.granted":
                mono[0] += 1.0
                rt.submit(ev.PassSensor("A"))
                rt.wait_idle(10)
            return d

        code, out, err = run_tool(["acl", "push", str(snapshot), "--form", form,
                                   *conn(pki.regional)])
        assert code == 0, out + err
        assert "applied" in out
        assert ("compact" in out) == (form == "compact")  # the snapshot as signed columns
        assert decide(PUPIL)["type"] == "access.granted"
        assert decide(NEWCOMER)["reason"] == "unknown_card"

        code, out, err = run_tool(["acl", "push", str(delta), *conn(pki.regional)])
        assert code == 0, out + err
        assert decide(PUPIL)["reason"] == "blocked"
        assert decide(NEWCOMER)["person"] == "p-9001"

        # Pushed again (a new signature, the same delta): the gate already holds it.
        code, out, err = run_tool(["acl", "push", str(delta), *conn(pki.regional, wait="1")])
        assert code == 3  # nothing new to apply, so no acl.applied comes
        # A gate's certificate may not push lists (broker ACL): refused, exit 1. (Gate B's: gate
        # A's own would take over the running gate's session, its client id being the identity.)
        code, out, err = run_tool(["acl", "push", str(snapshot), *conn(pki.gate_b, wait="0")])
        assert code == 1 and "not authorised" in out
    finally:
        uplink.stop()
        rt.stop()
        dl.close()
        journal.close()
