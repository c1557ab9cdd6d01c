"""Event records: the envelope every record of the contract carries.

The core fills ``v``, ``ts``, ``clock_synced``, ``boot``, ``mono``, ``type``
and the type's fields; the journal (or the simulator's sink) adds ``seq`` and
``id`` = ``{journal}:{seq}`` when it commits the record.
"""
from __future__ import annotations

from datetime import UTC, datetime

from agent import CONTRACT_VERSION

from .events import Now


def rfc3339_ms(epoch_s: float) -> str:
    """UTC RFC 3339 with milliseconds, e.g. 2026-09-01T07:45:00.125Z."""
    dt = datetime.fromtimestamp(epoch_s, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 date-time with its UTC offset (``Z`` or ``+07:00``) as an aware
    datetime (``.timestamp()`` for epoch seconds); fractions past microseconds are cut.
    ValueError for anything else, a time without an offset included."""
    # Python 3.11's fromisoformat reads "Z" and any number of fraction digits; RFC 3339
    # also allows a lower-case "t" and "z", which it does not.
    dt = datetime.fromisoformat(text.strip().upper())
    if dt.tzinfo is None:
        raise ValueError("no UTC offset")
    return dt


def make_record(rtype: str, now: Now, boot: str, **fields) -> dict:
    rec = {
        "v": CONTRACT_VERSION,
        "ts": rfc3339_ms(now.wall),
        "clock_synced": now.synced,
        "boot": boot,
        "mono": round(now.mono, 3),
        "type": rtype,
    }
    rec.update(fields)
    return rec


class SequenceSink:
    """An in-memory sink that numbers records like the journal does.

    The simulator and tests use it; the service uses the SQLite journal.
    """

    def __init__(self, journal: str = "sim") -> None:
        self.journal = journal
        self.seq = 0
        self.records: list[dict] = []

    def commit(self, records: list[dict]) -> list[dict]:
        out = []
        for rec in records:
            self.seq += 1
            numbered = {"id": f"{self.journal}:{self.seq}", "seq": self.seq, **rec}
            self.records.append(numbered)
            out.append(numbered)
        return out
