"""The site's other gates' events on their way in (agent/downlink, docs/site.md): what
reaches the gate as SiblingRecord and what is dropped, counted, before any parsing."""
from __future__ import annotations

import json

from agent.core.events import SiblingRecord
from agent.downlink import MAX_SITE_EVENT_BYTES, SITE_EVENTS_BURST, Downlink
from tests.twins import one_twin  # noqa: F401 (the fp fixture: one twin)

SITE, GATE = "school-17", "main"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def downlink(fp, tmp_path, clock=None):
    got: list = []
    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path / "state", submit=got.append,
                  publish=lambda *a: None, trusted_keys={}, allow_unsigned=True, acl_async=False,
                  monotonic=clock or Clock(), flood_timers=False)
    return dl, got


def event(n: int) -> bytes:
    return json.dumps({"v": 1, "id": f"side:{n}", "type": "passage", "person": "p-1"}).encode()


def test_a_siblings_record_reaches_the_gate_and_nothing_else_does(fp, tmp_path):
    dl, got = downlink(fp, tmp_path)
    dl.on_message(f"gate/v1/{SITE}/side/events", event(1))
    assert got == [SiblingRecord("side", json.loads(event(1)))]
    # Its own events (no_local should keep them away), another site's, other topics: nothing.
    for topic in (f"gate/v1/{SITE}/{GATE}/events", "gate/v1/other-school/side/events",
                  f"gate/v1/{SITE}/side/status", f"gate/v1/{SITE}/a/b/events",
                  f"gate/v1/{SITE}//events"):
        dl.on_message(topic, event(2))
    assert len(got) == 1
    assert dl.site_counts["accepted"] == 1 and dl.site_counts["received"] == 1


def test_junk_and_oversized_records_are_counted_and_dropped_unread(fp, tmp_path):
    dl, got = downlink(fp, tmp_path)
    topic = f"gate/v1/{SITE}/side/events"
    for payload in (b"\xff\xfe", b"[1, 2]", b"not json", b'"text"', b"{" * 100_000,
                    b'{"id": "x", "pad": "' + b"a" * MAX_SITE_EVENT_BYTES + b'"}'):
        dl.on_message(topic, payload)
    assert got == []
    assert dl.site_counts["oversize"] == 2 and dl.site_counts["malformed"] == 4


def test_a_sibling_flooding_is_held_to_the_rate_after_its_burst(fp, tmp_path):
    clock = Clock()
    dl, got = downlink(fp, tmp_path, clock)
    topic = f"gate/v1/{SITE}/side/events"
    n = int(SITE_EVENTS_BURST) + 500
    for i in range(n):
        dl.on_message(topic, event(i))  # an outage's backlog: all at once
    assert len(got) == int(SITE_EVENTS_BURST)
    assert dl.site_counts["over_budget"] == 500
    clock.t += 1.0  # a second later: 200 more
    for i in range(1000):
        dl.on_message(topic, event(n + i))
    assert len(got) == int(SITE_EVENTS_BURST) + 200


def test_a_gate_that_does_not_take_the_record_counts_it_dropped(fp, tmp_path):
    dl = Downlink(site=SITE, gate=GATE, fp=fp, state_dir=tmp_path / "state",
                  submit=lambda e: False, publish=lambda *a: None, trusted_keys={},
                  allow_unsigned=True, acl_async=False)
    dl.on_message(f"gate/v1/{SITE}/side/events", event(1))
    assert dl.site_counts["dropped"] == 1 and dl.site_counts["accepted"] == 0
