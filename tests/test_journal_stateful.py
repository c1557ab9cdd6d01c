"""The journal against a simple in-memory model (Hypothesis stateful test).

The model: a list of committed records, the set of seqs the server has
acknowledged, and the subset of those the journal was allowed to forget on a
crash (acknowledgements reach the disk at ``maintenance`` or ``close``; a crash
before that only brings records back, it never loses one).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent.core.events import Now
from agent.core.records import make_record
from agent.uplink.journal import Journal

BASE = 1_788_000_000.0
TYPES = ["access.granted", "access.denied", "passage", "reader.error", "alarm"]


def clock() -> Now:
    return Now(mono=1.0, wall=BASE)


class JournalMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="journal-model-"))
        self.path = self.dir / "journal.db"
        self.j = Journal(self.path, clock=clock, boot="b")
        self.jid = self.j.id
        self.records: list[dict] = []  # every record committed, by seq - 1
        self.acked: set[int] = set()  # acknowledged by the server
        self.durable_acks: set[int] = set()  # acknowledgements written to the table
        self.offered = 0  # highest seq the server can have seen
        self.offered_now = 0  # highest seq pending() offered in this run (a PUBACK needs one)
        self.n = 0

    def teardown(self) -> None:
        try:
            self.j.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def model_pending(self, after: int = 0) -> list[dict]:
        return [r for r in self.records if r["seq"] > after and r["seq"] not in self.acked]

    # --- rules ------------------------------------------------------------

    @rule(types=st.lists(st.sampled_from(TYPES), min_size=1, max_size=4))
    def commit(self, types: list[str]) -> None:
        batch = []
        for t in types:
            self.n += 1
            batch.append(make_record(t, Now(mono=float(self.n), wall=BASE + self.n), "b", n=self.n))
        out = self.j.commit(batch)
        first = len(self.records) + 1
        assert [r["seq"] for r in out] == list(range(first, first + len(batch)))
        assert [r["id"] for r in out] == [f"{self.jid}:{r['seq']}" for r in out]
        assert [r["n"] for r in out] == [b["n"] for b in batch]
        self.records.extend(out)

    @rule(data=st.data(), limit=st.integers(1, 8))
    def pending(self, data: st.DataObject, limit: int) -> None:
        after = data.draw(st.integers(0, len(self.records) + 1), label="after")
        got = self.j.pending(after, limit)
        assert got == self.model_pending(after)[:limit]
        if got:
            self.offered = max(self.offered, got[-1]["seq"])
            self.offered_now = max(self.offered_now, got[-1]["seq"])

    @precondition(lambda self: self.offered > 0)
    @rule(data=st.data())
    def ack_upto(self, data: st.DataObject) -> None:
        seq = data.draw(st.integers(0, self.offered), label="upto")
        assert self.j.ack_upto(self.jid, seq) is True
        self.acked |= set(range(1, seq + 1))

    @precondition(lambda self: self.offered_now > 0)
    @rule(data=st.data())
    def ack_one(self, data: st.DataObject) -> None:
        # Broker mode: a PUBACK answers a publish of this run, so only what this run offered.
        seq = data.draw(st.integers(1, self.offered_now), label="one")
        assert self.j.ack_one(seq) is True
        self.acked.add(seq)

    @rule(seq=st.integers(0, 50))
    def ack_for_another_journal(self, seq: int) -> None:
        assert self.j.ack_upto("not-" + self.jid, seq) is False

    @rule(days=st.sampled_from([0, 1, 40]))
    def maintenance(self, days: int) -> None:
        # Retention purges acknowledged records only: the model does not see them.
        out = self.j.maintenance(BASE + days * 86400.0)
        assert out == []  # nothing to report: no capacity or disk trouble here
        self.durable_acks = set(self.acked)

    @rule()
    def reopen(self) -> None:
        self.j.close()  # close applies every acknowledgement
        self.durable_acks = set(self.acked)
        self.j = Journal(self.path, clock=clock, boot="b")
        self.offered_now = 0
        assert self.j.id == self.jid

    @rule()
    def crash(self) -> None:
        # The process dies: the old connections go without close() or maintenance.
        old, self.j = self.j, Journal(self.path, clock=clock, boot="b")
        del old
        self.offered_now = 0
        assert self.j.id == self.jid
        self.acked = set(self.durable_acks)  # unwritten acks are lost: records come back

    # --- invariants --------------------------------------------------------

    @invariant()
    def backlog_matches(self) -> None:
        assert self.j.backlog() == len(self.model_pending())

    @invariant()
    def nothing_lost_and_order_kept(self) -> None:
        got = self.j.pending(0, 10_000)
        assert got == self.model_pending()


TestJournalModel = JournalMachine.TestCase
TestJournalModel.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
