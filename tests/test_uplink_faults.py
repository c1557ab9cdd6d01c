"""Faults against a real mosquitto: the broker killed while events flow, the broker's ACL
refusing events. Nothing the gate journalled may be lost."""
# ruff: noqa: F811 - pytest fixtures imported from tests.broker, used as arguments
from __future__ import annotations

import threading

from agent.contract import topics
from tests.broker import (  # noqa: F401 - fixtures
    GATE,
    SITE,
    Observer,
    broker,
    ingest_at,
    journal,
    make_broker,
    passage,
    uplinks,
    wait_until,
)

T = topics(SITE, GATE)


class Gate(threading.Thread):
    """Plays the gate thread: commits records one by one and wakes the uplink."""

    def __init__(self, journal, uplink, total: int) -> None:
        super().__init__(name="gate", daemon=True)
        self.journal, self.uplink, self.total = journal, uplink, total
        self.committed: list[dict] = []
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i in range(self.total):
                self.committed += self.journal.commit([passage(i)])
                self.uplink.wake()
                self.done.wait(0.004)  # a steady flow, not a burst
        except Exception as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc
        finally:
            self.done.set()


def test_broker_killed_and_restarted_while_events_flow_loses_nothing(
    make_broker, journal, uplinks, ingest_at
):
    broker = make_broker()
    ingest = ingest_at(broker)
    commands: list[tuple[str, bytes]] = []
    with Observer(broker, T["events"]) as wire:
        up = uplinks(journal, broker, resend_after_s=1.0,
                     on_message=lambda topic, payload, props, retain: commands.append((topic, payload)))
        gate = Gate(journal, up, total=400)
        gate.start()
        for outage in (60, 220):  # two outages, each while the gate keeps committing
            wait_until(lambda n=outage: len(gate.committed) >= n, 20, f"{outage} records committed")
            broker.kill()
            wait_until(lambda n=outage: len(gate.committed) >= n + 60 or gate.done.is_set(), 20,
                       "records committed during the outage")
            broker.start()
        gate.join(30)
        assert gate.error is None and len(gate.committed) == 400
        wait_until(lambda: journal.backlog() == 0, 40, "every event acknowledged by the ingest")

        # The uplink resubscribed after the restarts: commands reach it.
        wait_until(lambda: up.connected, 10, "reconnect")
        wire.publish(T["cmd"], b'{"probe": 1}')
        wait_until(lambda: commands, 10, "a command after the restarts")
        seen = wire.records()

    stored = ingest.events(SITE, GATE)
    assert [e["seq"] for e in stored] == list(range(1, 401)), "an event was lost or misnumbered"
    assert stored == gate.committed
    assert up.stats()["reconnects"] >= 2
    copies: dict[str, dict] = {}
    for rec in seen:  # resends after the outages keep their id and content
        assert copies.setdefault(rec["id"], rec) == rec
    assert commands == [(T["cmd"], b'{"probe": 1}')]


ACL_REFUSING_EVENTS = f"""# anonymous clients (the gate): everything but its events topic
topic readwrite {T['status']}
topic write {T['telemetry']}
topic read {T['ack']}
topic read {T['acl']}
topic read {T['cmd']}

user ingest
topic readwrite gate/#
"""


def test_broker_refusing_events_keeps_them_and_raises_publish_refused(make_broker, journal, uplinks,
                                                                     ingest_at):
    broker = make_broker(acl=ACL_REFUSING_EVENTS)
    alarms: list[tuple[str, bool, str]] = []
    committed = journal.commit([passage(i) for i in range(5)])
    up = uplinks(journal, broker, on_alarm=lambda *a: alarms.append(a), backoff_min_s=0.2)
    wait_until(lambda: alarms, 10, "the publish_refused alarm")
    kind, active, detail = alarms[0]
    assert (kind, active) == ("publish_refused", True)
    assert "0x87" in detail and "ACL" in detail
    wait_until(lambda: up.stats()["published"] > len(committed), 10, "a retry after the backoff")
    assert journal.backlog() == len(committed), "a refused event left the journal"
    assert [a[:2] for a in alarms] == [("publish_refused", True)], "the alarm repeats while it lasts"

    # The region fixes its ACL: the same events go through and the alarm clears.
    broker.acl_path.write_text(ACL_REFUSING_EVENTS.replace(
        f"topic read {T['cmd']}", f"topic read {T['cmd']}\ntopic write {T['events']}"))
    broker.reload()
    ingest = ingest_at(broker, username="ingest")
    wait_until(lambda: journal.backlog() == 0, 20, "the events after the ACL fix")
    assert [e["id"] for e in ingest.events()] == [r["id"] for r in committed]
    assert [a[:2] for a in alarms] == [("publish_refused", True), ("publish_refused", False)]


def test_a_forged_ack_never_makes_the_gate_forget_records_it_has_not_sent(make_broker, journal,
                                                                         uplinks, ingest_at):
    # The broker refuses the gate's events for now, so nothing is sent; meanwhile someone
    # with the right to publish acks (a forger who got records stored under this journal's
    # id) acknowledges every record the gate has made, and some it has not.
    broker = make_broker(acl=ACL_REFUSING_EVENTS)
    alarms: list[tuple[str, bool, str]] = []
    committed = journal.commit([passage(i) for i in range(5)])
    up = uplinks(journal, broker, on_alarm=lambda *a: alarms.append(a), backoff_min_s=0.2)
    wait_until(lambda: any(a[0] == "publish_refused" for a in alarms), 10, "the refusal")
    journal.sync()
    with Observer(broker, "nothing/here", username="ingest") as forger:
        def forge() -> bool:  # again and again: the refused gate reconnects now and then
            forger.publish(T["ack"], f'{{"journal": "{journal.id}", "upto": 5}}')
            forger.publish(T["ack"], f'{{"journal": "{journal.id}", "upto": 40}}')
            return any(a[0] == "ack_ahead" for a in alarms)

        wait_until(lambda: forge() or journal.backlog() < len(committed), 15,
                   "the gate to take a forged ack")
        for _ in range(10):
            forge()
    assert journal.backlog() == len(committed), "a forged ack made the gate forget unsent records"
    _kind, active, detail = next(a for a in alarms if a[0] == "ack_ahead")
    assert active and "40" in detail and "made only 5" in detail

    # The ACL is fixed: the real records go out and are stored, then acknowledged.
    broker.acl_path.write_text(ACL_REFUSING_EVENTS.replace(
        f"topic read {T['cmd']}", f"topic read {T['cmd']}\ntopic write {T['events']}"))
    broker.reload()
    ingest = ingest_at(broker, username="ingest")
    wait_until(lambda: journal.backlog() == 0, 20, "the records, sent and acknowledged")
    assert [e["id"] for e in ingest.events()] == [r["id"] for r in committed]
    assert up.stats()["acked"] == len(committed)
