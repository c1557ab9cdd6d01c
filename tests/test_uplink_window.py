"""The uplink's delivery window alone (agent/uplink/window.py): no broker, no paho, no clock.

Each test plays the driver: it feeds the window records from a list standing in
for the journal, PUBACKs and acks, and the time, and checks what the window
says to do. tests/test_uplink.py and tests/test_uplink_faults.py check the same
rules end to end against a real mosquitto.
"""
from __future__ import annotations

import itertools

import pytest

from agent.uplink.window import (
    ACK_AHEAD_QUIET_S,
    ERROR,
    INFO,
    RESEND_MAX_S,
    WARNING,
    AckOne,
    AckUpto,
    Alarm,
    Error,
    Log,
    NeedOldest,
    Window,
)

JID = "j1"
BATCH = 4  # small, so the tests cross batch boundaries


class Driver:
    """What agent/uplink/mqtt.py does around the window, minus paho: a journal as a list."""

    def __init__(self, win: Window, n: int = 0) -> None:
        self.win = win
        self.records = [{"seq": s, "id": f"{win.journal_id}:{s}"} for s in range(1, n + 1)]
        self.mids = itertools.count(1)
        self.wire: list[tuple[int, int]] = []  # (mid, seq) in the order handed to the client
        self.reads: list[int] = []  # the after_seq of each journal read

    def pending(self, after: int, limit: int) -> list[dict]:
        self.reads.append(after)
        return [r for r in self.records if r["seq"] > after][:limit]

    def commit(self, n: int) -> None:
        last = max((s for _, s in self.wire), default=0)
        last = max([last, *(r["seq"] for r in self.records)])
        self.records += [{"seq": s, "id": f"{self.win.journal_id}:{s}"} for s in range(last + 1, last + n + 1)]
        self.win.more()

    def ack_upto(self, upto: int) -> None:
        self.records = [r for r in self.records if r["seq"] > upto]

    def fill(self, now: float = 0.0) -> list[int]:
        """Send what the window lets out; the seqs sent."""
        sent: list[int] = []
        if self.win.paused(now):
            return sent
        for _ in range(10_000):  # the uplink thread's loop must end: a window that spins fails here
            if not self.win.has_room():
                break
            rec = self.win.next_record()
            if rec is None:
                after = self.win.fetch_after()
                if after is None or not self.win.feed(self.pending(after, BATCH), BATCH):
                    break
                continue
            mid = next(self.mids)
            self.win.sent(mid, rec)
            self.wire.append((mid, rec["seq"]))
            sent.append(rec["seq"])
        else:
            raise AssertionError(f"filling the window did not end (reads after {self.reads[-5:]})")
        return sent

    def mid_of(self, seq: int) -> int:
        return [m for m, s in self.wire if s == seq][-1]

    def puback(self, seq: int, rc: int = 0, now: float = 0.0) -> list:
        return self.win.puback(self.mid_of(seq), rc, now)


def ack(upto: int, journal: str = JID) -> bytes:
    return f'{{"journal":"{journal}","upto":{upto}}}'.encode()


def window(**kw) -> Window:
    kw.setdefault("window", 3)
    return Window(JID, **kw)


# --- order, slots, the journal reads ---------------------------------------------------


def test_records_go_out_in_seq_order_and_no_more_than_the_window_at_once():
    d = Driver(window(window=3), n=10)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3]
    assert not d.win.has_room()
    assert d.fill() == []
    d.puback(2)
    assert d.fill() == [4]  # one slot freed, the next seq goes
    for seq in (1, 3, 4):
        d.puback(seq)
    assert d.fill() == [5, 6, 7]
    assert [s for _, s in d.wire] == list(range(1, 8))


def test_the_journal_is_read_in_batches_after_the_last_seq_sent_and_not_again_until_told():
    d = Driver(window(window=100), n=6)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3, 4, 5, 6]
    assert d.reads == [0, 4]  # a full batch, then the short one that says "no more"
    assert d.fill() == [] and d.reads == [0, 4]  # nothing new: no read
    d.commit(2)  # the wake-up
    assert d.fill() == [7, 8]
    assert d.reads[-1] == 6


def test_the_safety_poll_reads_the_journal_once_a_second_even_without_a_wake_up():
    d = Driver(window(window=100), n=1)
    d.win.connected(0.0)
    d.win.tick(0.0)
    assert d.fill() == [1]
    d.records.append({"seq": 2, "id": f"{JID}:2"})  # committed, wake-up lost
    assert d.fill() == []
    assert d.win.next_deadline(0.5) == 1.0
    d.win.tick(0.999)
    assert d.fill(0.999) == []
    d.win.tick(1.0)
    assert d.fill(1.0) == [2]


def test_a_batch_of_another_journal_is_not_sent():
    # The journal switched between the driver's look and its read: nothing of it goes out
    # under this window's bookkeeping, and the window reads again once switched.
    d = Driver(window(window=10), n=0)
    d.win.connected(0.0)
    d.records = [{"seq": 1, "id": "j2:1"}]
    assert d.fill() == []
    assert d.win.fetch_after() == 0  # it still wants to read
    d.win.switch_journal("j2", 0.0)
    assert d.fill() == [1]


def test_a_record_the_client_would_not_take_goes_first_next_time():
    d = Driver(window(window=5), n=3)
    d.win.connected(0.0)
    rec = d.win.next_record() or (d.win.feed(d.pending(d.win.fetch_after(), BATCH), BATCH) and d.win.next_record())
    assert rec["seq"] == 1
    d.win.put_back(rec)
    assert d.fill() == [1, 2, 3]


def test_status_and_replies_take_a_slot_until_their_puback():
    d = Driver(window(window=2), n=5)
    d.win.connected(0.0)
    d.win.track(900)  # the birth message
    assert d.fill() == [1]
    assert d.win.puback(900, 0, 0.0) == []
    assert d.fill() == [2]


def test_the_brokers_receive_maximum_caps_the_window():
    d = Driver(window(window=20), n=30)
    d.win.connected(0.0, receive_max=4)
    assert d.win.size == 4
    assert d.fill() == [1, 2, 3, 4]
    d.win.connected(1.0, receive_max=None)
    assert d.win.size == 20


# --- PUBACK versus the ingest's ack ---------------------------------------------------


def test_in_ingest_mode_a_puback_frees_a_slot_but_acknowledges_nothing():
    d = Driver(window(ack_mode="ingest"), n=3)
    d.win.connected(0.0)
    d.fill()
    effects = [e for seq in (1, 2, 3) for e in d.puback(seq)]
    assert not [e for e in effects if isinstance(e, (AckOne, AckUpto))]
    assert d.win.acked == 0 and len(d.win.inflight) == 0
    assert d.win.ack_message(ack(3), 1.0, made=3) == [AckUpto(JID, 3, ours=True)]
    assert d.win.acked == 3


def test_in_broker_mode_a_puback_acknowledges_its_record_and_0x10_raises_broker_dropped():
    d = Driver(window(ack_mode="broker"), n=3)
    d.win.connected(0.0)
    d.fill()
    assert d.puback(1) == [AckOne(1, JID), Alarm("broker_dropped", False, "")]
    dropped = d.puback(2, rc=0x10)
    assert dropped[0] == AckOne(2, JID)
    assert isinstance(dropped[1], Alarm) and dropped[1].kind == "broker_dropped" and dropped[1].active
    assert "seq 2" in dropped[1].detail
    assert d.win.acked == 2
    assert d.win.ack_message(ack(3), 1.0, made=3) == []  # the ingest's ack is not this mode's word


def test_in_ingest_mode_0x10_sends_again_after_a_backoff_that_grows_until_an_ack():
    d = Driver(window(window=10, backoff_min_s=0.5, resend_after_s=30.0), n=2)
    d.win.connected(0.0)
    d.fill()
    effects = d.puback(1, rc=0x10, now=10.0)
    assert effects == [Log(INFO, "no subscriber took event seq 1 (0x10); resending in 0.5 s")]
    assert d.puback(2, rc=0x10, now=10.0) == []  # one resend already due
    d.win.tick(10.0)
    assert d.win.next_deadline(10.0) == 10.5
    d.win.tick(10.49)
    assert d.fill(10.49) == []
    d.win.tick(10.5)
    assert d.fill(10.5) == [1, 2]
    assert "resending in 1.0 s" in d.puback(1, rc=0x10, now=11.0)[0].message  # doubled
    d.puback(2, now=11.0)
    d.win.ack_message(ack(2), 12.0, made=2)  # progress resets the backoff
    d.commit(1)
    d.win.tick(13.0)
    d.fill(13.0)
    assert "resending in 0.5 s" in d.puback(3, rc=0x10, now=13.0)[0].message


# --- acks: clamping, ack_ahead, other journals -----------------------------------------


def test_an_ack_never_reaches_past_what_the_broker_accepted_from_this_run():
    d = Driver(window(window=5), n=5)
    d.win.connected(0.0)
    d.fill()
    d.puback(1)
    d.puback(2)
    # The ingest (or a forger under this journal id) acks 5: only 1..2 were accepted.
    assert d.win.ack_message(ack(5), 1.0, made=5) == [AckUpto(JID, 2, ours=True)]
    assert d.win.acked == 2 and d.win.acked_upto == 2
    d.puback(3)
    assert d.win.ack_message(ack(5), 2.0, made=5) == [AckUpto(JID, 3, ours=True)]
    assert d.win.acked == 3


def test_an_ack_beyond_the_journals_records_raises_ack_ahead_logged_once_and_clears_after_quiet():
    d = Driver(window(window=5), n=2)
    d.win.connected(0.0)
    d.fill()
    d.puback(1)
    d.puback(2)
    first = d.win.ack_message(ack(1000), 5.0, made=2)
    assert [type(e) for e in first] == [Log, Alarm, AckUpto]
    assert first[0].level == ERROR and "up to seq 1000" in first[0].message and "made only 2" in first[0].message
    assert first[1].kind == "ack_ahead" and first[1].active
    assert first[2] == AckUpto(JID, 2, ours=True)
    again = d.win.ack_message(ack(1001), 100.0, made=2)
    assert [type(e) for e in again] == [Alarm, AckUpto]  # no second error line while it lasts

    def alarms(now: float) -> list:
        return [e for e in d.win.tick(now) if isinstance(e, Alarm)]  # the resend timer runs too

    assert alarms(100.0 + ACK_AHEAD_QUIET_S - 1) == []
    cleared = alarms(100.0 + ACK_AHEAD_QUIET_S)
    assert cleared == [Alarm("ack_ahead", False, f"no ack beyond this gate's records for {ACK_AHEAD_QUIET_S:.0f} s")]
    assert alarms(100.0 + 2 * ACK_AHEAD_QUIET_S) == []


def test_an_ack_within_the_journals_records_raises_nothing():
    d = Driver(window(window=5), n=3)
    d.win.connected(0.0)
    d.fill()
    d.puback(1)
    assert d.win.ack_message(ack(3), 1.0, made=3) == [AckUpto(JID, 1, ours=True)]


def test_an_ack_for_another_journal_is_passed_on_unclamped_and_moves_nothing():
    d = Driver(window(window=5), n=3)
    d.win.connected(0.0)
    d.fill()
    assert d.win.ack_message(ack(7, journal="old"), 1.0, made=3) == [AckUpto("old", 7, ours=False)]
    assert d.win.acked == 0 and d.win.acked_upto == 0


@pytest.mark.parametrize("payload", [b"", b"not json", b"{}", b'{"journal":"j1"}', b'{"journal":1,"upto":2}',
                                     b'{"journal":"j1","upto":"2"}', b'{"journal":"j1","upto":true}',
                                     b"[1,2]", b"\xff" * 300, b"{" + b"x" * 300])
def test_a_malformed_ack_is_logged_and_changes_nothing(payload):
    win = window()
    effects = win.ack_message(payload, 0.0, made=10)
    assert len(effects) == 1 and effects[0].level == WARNING
    assert effects[0].message.startswith("ignoring malformed ack on ack (")
    assert "x" * 201 not in effects[0].message  # the payload is cut at 200 bytes
    assert win.acked_upto == 0


def test_only_records_this_run_sent_count_as_acknowledged():
    # Records 1..3 were sent by an earlier run; this run sends from 4. An ack to 5 counts 2.
    d = Driver(window(window=5), n=5)
    d.records = d.records[3:]
    d.win.connected(0.0)
    assert d.fill() == [4, 5]
    d.puback(4)
    d.puback(5)
    d.win.ack_message(ack(5), 1.0, made=5)
    assert d.win.acked == 2


# --- resends: timeout, reconnect, rewind -------------------------------------------------


def test_a_stalled_event_is_resent_resend_after_s_after_the_last_ack_progress():
    # The last ack came 1 s after the connect's check was set, so the resend is due 30 s after
    # that ack (t=31), not a whole period after the next check (t=60).
    d = Driver(window(window=5, resend_after_s=30.0), n=3)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3]
    for seq in (1, 2, 3):
        d.puback(seq)
    d.win.ack_message(ack(1), 1.0, made=3)
    d.ack_upto(1)
    assert d.win.tick(30.0) == []
    assert d.win.tick(31.0 - 1e-6) == []
    assert d.win.tick(31.0) == [NeedOldest()]
    assert d.win.resend_check(2) == [Log(INFO, "no ingest ack for 30 s; resending from seq 2; "
                                              "the next resend in 60 s unless an ack comes")]
    assert d.fill(31.0) == [2, 3]
    assert d.win.tick(31.5) == []
    assert d.win.tick(61.0) == []  # that round brought no ack: the next waits twice as long
    assert d.win.tick(91.0) == [NeedOldest()]


def test_no_resend_for_a_record_still_on_the_wire_or_never_sent():
    d = Driver(window(window=2, resend_after_s=30.0), n=3)
    d.win.connected(0.0)
    assert d.fill() == [1, 2]
    assert d.win.tick(30.0) == [NeedOldest()]
    assert d.win.resend_check(1) == []  # no PUBACK yet: still in flight
    d.puback(1)
    d.puback(2)
    assert d.win.resend_check(3) == []  # never sent: the window sends it in order anyway
    assert d.win.resend_check(None) == []
    assert d.fill() == [3]


def test_broker_mode_has_no_resend_timer():
    d = Driver(window(ack_mode="broker", resend_after_s=30.0), n=1)
    d.win.connected(0.0)
    d.fill()
    assert d.win.tick(1000.0) == []


def test_a_reconnect_forgets_what_was_in_flight_and_sends_everything_pending_again():
    d = Driver(window(window=3), n=5)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3]
    d.puback(1)
    d.win.reset()  # the link is lost
    assert len(d.win.inflight) == 0
    d.win.connected(5.0)
    assert d.fill(5.0) == [1, 2, 3]  # unacknowledged by the ingest: all of them again, in order
    # A PUBACK of the old session's message id changes nothing.
    assert d.win.puback(3, 0, 5.0) == []  # mid 3 was seq 3 of the old session
    assert len(d.win.inflight) == 3


def test_a_new_session_alone_forgets_what_was_in_flight():
    # CONNACK of a clean-start session: the old session's messages are gone with it.
    d = Driver(window(window=2), n=2)
    d.win.connected(0.0)
    assert d.fill() == [1, 2]
    d.win.connected(1.0)
    assert d.win.has_room() and d.fill(1.0) == [1, 2]


def test_a_rewind_skips_records_still_on_the_wire():
    d = Driver(window(window=4), n=6)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3, 4]
    d.puback(1)
    d.puback(2)
    d.win.rewind()
    assert d.fill() == [1, 2]  # unacknowledged by the ingest: again
    d.puback(1)
    d.puback(2)
    assert d.fill() == [5, 6]  # 3 and 4 have no PUBACK yet: not sent twice
    d.puback(3)
    d.win.rewind()
    assert d.fill() == [1]


def test_a_window_wider_than_a_journal_read_reads_past_a_batch_still_on_the_wire():
    # window 6, reads of 4: after a rewind with 1..5 still in flight, the first read holds
    # nothing to send; the next read must start after it, not fetch the same four again.
    d = Driver(window(window=6), n=8)
    d.win.connected(0.0)
    assert d.fill() == [1, 2, 3, 4, 5, 6]
    d.puback(6)
    d.win.rewind()
    assert d.fill() == [6]
    assert d.reads[-2:] == [0, 4]
    d.win.more()
    d.puback(6)
    assert d.fill() == [7]  # after what was sent, as before
    assert d.win.cursor == 7


def test_a_journal_switch_starts_the_new_journal_from_nothing():
    d = Driver(window(window=3, ack_mode="broker"), n=3)
    d.win.connected(0.0)
    d.fill()
    old_mid = d.mid_of(1)
    d.win.switch_journal("j2", 1.0)
    # The old journal's PUBACKs free their slots and acknowledge nothing.
    assert d.win.puback(old_mid, 0, 1.0) == []
    assert len(d.win.inflight) == 2
    d.records = [{"seq": 1, "id": "j2:1"}]
    d.win.puback(d.mid_of(2), 0, 1.0)
    d.win.puback(d.mid_of(3), 0, 1.0)
    assert d.fill(1.0) == [1]
    assert d.puback(1, now=1.0)[0] == AckOne(1, "j2")
    assert d.win.sent_upto == 1


# --- resends without an ack: the backoff ---------------------------------------------------
# A site broker whose link to the region is down PUBACKs every publish, but no ingest ack can
# come; every copy reaches the site's other gates and waits in the bridge's queue (docs/site-broker.md).


def outage(d: Driver, start: float, end: float, step: float = 1.0, answer: int | None = None) -> list[float]:
    """Run the window from ``start`` to ``end`` as the uplink thread would, the broker answering
    every PUBACK; the times of the resend rounds. ``answer``: the ingest answers each batch it
    gets, half a step later, with an ack up to this seq (None: no ingest ack comes)."""
    rounds: list[float] = []
    now = start
    while now <= end:
        for effect in d.win.tick(now):
            if effect == NeedOldest():
                oldest = d.records[0]["seq"] if d.records else None
                if d.win.resend_check(oldest):
                    rounds.append(now)
        sent = d.fill(now)
        for seq in sent:
            d.puback(seq, now=now)
        if sent and answer is not None:
            d.win.ack_message(ack(answer), now + step / 2, made=d.win.cursor)
            d.ack_upto(answer)
        now += step
    return rounds


def copies(d: Driver) -> dict[int, int]:
    """How many times each seq went on the wire."""
    out: dict[int, int] = {}
    for _, seq in d.wire:
        out[seq] = out.get(seq, 0) + 1
    return out


def test_resend_rounds_that_bring_no_ack_come_twice_as_far_apart_up_to_15_minutes():
    # An hour without ingest acks: 7 resend rounds, not 120 (one every 30 s, as before).
    d = Driver(window(window=10, resend_after_s=30.0), n=8)
    d.win.connected(0.0)
    rounds = outage(d, 0.0, 3600.0)
    assert rounds == [30.0, 90.0, 210.0, 450.0, 930.0, 1830.0, 2730.0]
    assert RESEND_MAX_S == 900.0
    # Each round sends the whole backlog again, in order, under the same ids.
    assert copies(d) == dict.fromkeys(range(1, 9), 1 + len(rounds))
    assert [s for _, s in d.wire] == list(range(1, 9)) * (1 + len(rounds))


def test_records_made_during_the_backoff_go_out_at_once_and_only_resends_wait():
    d = Driver(window(window=10, resend_after_s=30.0), n=2)
    d.win.connected(0.0)
    assert outage(d, 0.0, 100.0) == [30.0, 90.0]
    d.commit(2)  # seqs 3 and 4, while the next round is held back until t=210
    assert d.fill(101.0) == [3, 4]
    for seq in (3, 4):
        d.puback(seq, now=101.0)
    assert outage(d, 102.0, 300.0) == [210.0]
    assert d.wire[-4:] == [(d.mid_of(s), s) for s in (1, 2, 3, 4)]  # the round sends from the oldest


def test_an_ack_that_moves_forward_brings_the_next_resend_back_to_resend_after_s():
    d = Driver(window(window=10, resend_after_s=30.0), n=4)
    d.win.connected(0.0)
    assert outage(d, 0.0, 460.0) == [30.0, 90.0, 210.0, 450.0]  # the next would be at 930
    d.win.ack_message(ack(2), 500.0, made=4)
    d.ack_upto(2)
    # 30 s after the ack, then doubling again from there.
    assert outage(d, 501.0, 700.0) == [530.0, 590.0]
    assert [s for _, s in d.wire[-4:]] == [3, 4, 3, 4]


def test_an_ingest_that_answers_every_round_but_moves_nothing_does_not_end_the_backoff():
    # A record the ingest never takes (seq 3): it acknowledges up to 2 whatever comes.
    d = Driver(window(window=10, resend_after_s=30.0), n=2)
    d.win.connected(0.0)
    assert outage(d, 0.0, 1.0, answer=2) == []
    d.commit(2)
    assert outage(d, 2.0, 500.0, answer=2) == [31.0, 91.0, 211.0, 451.0]
    d.win.ack_message(ack(1), 500.0, made=4)  # an ack lagging behind moves nothing either
    assert outage(d, 500.0, 1000.0, answer=2) == [931.0]


def test_an_ingest_back_after_silence_that_moves_nothing_ends_the_backoff():
    # The ingest was away (its session, and the events sent meanwhile, thrown away): when it
    # answers again, below what it lost, the gate sends again soon, not at the next round (451).
    d = Driver(window(window=10, resend_after_s=30.0), n=2)
    d.win.connected(0.0)
    assert outage(d, 0.0, 1.0, answer=2) == []
    d.commit(2)
    assert outage(d, 2.0, 250.0) == [31.0, 91.0, 211.0]  # silent
    d.commit(1)
    assert d.fill(250.0) == [5]
    d.puback(5, now=250.0)
    effects = d.win.ack_message(ack(2), 250.5, made=5)  # the ingest holds 5, and lacks 3 and 4
    assert Log(INFO, "the ingest acknowledges again but only up to seq 2; resending within 30 s") in effects
    assert outage(d, 251.0, 300.0, answer=5) == [281.0]
    assert d.records == [] and d.win.acked_upto == 5


def test_a_new_connection_sends_everything_again_and_ends_the_backoff():
    d = Driver(window(window=10, resend_after_s=30.0), n=3)
    d.win.connected(0.0)
    assert outage(d, 0.0, 460.0) == [30.0, 90.0, 210.0, 450.0]
    d.win.reset()
    d.win.connected(600.0)
    before = len(d.wire)
    assert outage(d, 600.0, 700.0) == [630.0, 690.0]
    assert [s for _, s in d.wire[before:]] == [1, 2, 3] * 3  # at the connect, then each round


def test_a_journal_switch_ends_the_backoff():
    d = Driver(window(window=10, resend_after_s=30.0), n=2)
    d.win.connected(0.0)
    assert outage(d, 0.0, 460.0) == [30.0, 90.0, 210.0, 450.0]
    d.win.switch_journal("j2", 500.0)
    d.records = [{"seq": 1, "id": "j2:1"}]
    assert outage(d, 500.0, 600.0) == [530.0, 590.0]


def test_the_resend_backoff_is_jittered_never_below_resend_after_s_and_bounded_in_rounds():
    # The worst jitter (always the low end): each wait is half the doubled one, never under
    # resend_after_s, at most RESEND_MAX_S.
    low = Driver(window(window=10, resend_after_s=30.0, uniform=lambda a, b: a), n=2)
    low.win.connected(0.0)
    rounds = outage(low, 0.0, 3600.0)
    assert rounds == [30.0, 60.0, 120.0, 240.0, 480.0, 930.0, 1380.0, 1830.0, 2280.0, 2730.0, 3180.0]
    assert low.win.resend_wait(1) == 30.0 and low.win.resend_wait(50) == RESEND_MAX_S / 2
    high = window(resend_after_s=30.0)
    assert [high.resend_wait(k) for k in range(1, 7)] == [60.0, 120.0, 240.0, 480.0, 900.0, 900.0]
    # Whatever the jitter: T seconds without an ack cost at most 1 + log2(T / resend_after_s)
    # rounds while the doubled wait is under the cap.
    import math
    import random

    rng = random.Random(14)
    for _ in range(20):
        d = Driver(window(window=10, resend_after_s=1.0, uniform=rng.uniform), n=2)
        d.win.connected(0.0)
        rounds = outage(d, 0.0, 400.0, step=0.25)
        for k, t in enumerate(rounds, 1):
            assert k <= 1 + math.log2(t / 1.0), rounds


def test_a_resend_backoff_longer_than_the_cap_keeps_resend_after_s():
    win = window(resend_after_s=2000.0)
    assert win.resend_wait(1) == 2000.0  # a configured period longer than the cap is kept


# --- refusals -----------------------------------------------------------------------------


def test_a_refused_publish_keeps_the_record_pauses_and_retries_after_a_growing_backoff():
    d = Driver(window(window=3, backoff_min_s=1.0, backoff_max_s=8.0), n=3)
    d.win.connected(0.0)
    d.fill()
    first = d.puback(1, rc=0x87, now=10.0)
    assert [type(e) for e in first] == [Error, Alarm, Log]
    assert first[1] == Alarm("publish_refused", True, first[0].message)
    assert "seq 1" in first[0].message and "ACL" in first[0].message and first[2].level == ERROR
    # The rest of the window refused in the same burst: one backoff step, no new log line.
    assert [type(e) for e in d.puback(2, rc=0x87, now=10.1)] == [Error, Alarm]
    d.puback(3, rc=0x87, now=10.1)
    assert d.win.paused(10.5) and d.fill(10.5) == []
    d.win.tick(10.5)
    assert d.win.next_deadline(10.5) == 11.0  # no jitter given: the full delay
    d.win.tick(11.0)
    assert not d.win.paused(11.0)
    assert d.fill(11.0) == [1, 2, 3]  # nothing was acknowledged: all again
    d.puback(1, rc=0x87, now=12.0)
    assert d.win.paused_until == 14.0  # the second step: twice the delay
    d.win.tick(14.0)
    d.fill(14.0)
    assert d.puback(1, now=15.0) == [Alarm("publish_refused", False, "the broker accepts events again")]


def test_the_refusal_backoff_is_capped_and_jittered_by_the_drivers_function():
    calls = []

    def uniform(low, high):
        calls.append((low, high))
        return low

    d = Driver(window(window=1, backoff_min_s=1.0, backoff_max_s=4.0, uniform=uniform), n=1)
    d.win.connected(0.0)
    now = 0.0
    for _ in range(5):
        d.win.tick(now)
        assert d.fill(now) == [1]
        d.puback(1, rc=0x87, now=now)
        now = d.win.paused_until
    assert calls == [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0), (2.0, 4.0)]


def test_a_refusal_pause_outlives_a_reconnect():
    d = Driver(window(window=1, backoff_min_s=2.0), n=1)
    d.win.connected(0.0)
    d.fill()
    d.puback(1, rc=0x87, now=1.0)
    d.win.reset()
    d.win.connected(1.5)
    assert d.win.paused(1.5) and d.fill(1.5) == []
    d.win.tick(3.0)
    assert d.fill(3.0) == [1]


def test_a_refused_status_publish_is_logged_and_frees_its_slot():
    win = window(window=1)
    win.track(50)
    effects = win.puback(50, 0x87, 0.0, "0x87 Not authorized")
    assert effects == [Log(WARNING, "broker refused a status/reply publish: 0x87 Not authorized")]
    assert win.has_room()


# --- figures and sameness -------------------------------------------------------------------


def test_the_drain_rate_counts_acknowledged_records_over_the_last_seconds():
    d = Driver(window(window=100), n=40)
    d.win.connected(0.0)
    d.fill()
    for seq in range(1, 41):
        d.puback(seq)
    assert d.win.drain_rate(0.0) == 0.0
    d.win.ack_message(ack(10), 1.0, made=40)
    d.win.ack_message(ack(40), 4.0, made=40)
    assert d.win.drain_rate(4.0) == pytest.approx(30 / 3)
    assert d.win.published == 40 and d.win.acked == 40


def test_the_same_calls_give_the_same_effects():
    def run() -> list:
        d = Driver(window(window=2, ack_mode="ingest"), n=4)
        d.win.connected(0.0)
        out: list = []
        for t in range(6):
            now = float(t)
            out += d.win.tick(now)
            sent = d.fill(now)
            out += [e for seq in sent for e in d.puback(seq, rc=(0x87 if seq == 2 and t < 2 else 0), now=now)]
            out += d.win.ack_message(ack(max(sent, default=0)), now, made=4)
        return out + [d.wire]

    assert run() == run()



def test_the_backoff_doubles_from_low_to_high_and_jitters_between_half_and_all():
    from agent.uplink.window import backoff_s

    full = [backoff_s(n, 0.5, 4.0, lambda lo, hi: hi) for n in range(6)]
    assert full == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_s(2, 0.5, 4.0, lambda lo, hi: lo) == 1.0
    assert backoff_s(10_000, 0.5, 60.0, lambda lo, hi: hi) == 60.0  # no overflow on a long outage
