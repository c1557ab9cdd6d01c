"""Presence (who is inside now) and the fire roll-call: docs/presence.md.

Pure, like the rest of the core: no clock, no files. The caller gives the
wall time and the time zone; the Gate (agent/core/turnstile.py) feeds it its
own records and, through ``Gate.apply_sibling``, a sibling gate's.

Rules:

- Presence counts one *presence day*: from the configured reset time
  (``gate.presence_reset``, local, default 03:00) to the next day's. At the
  first call of a new day everybody is cleared: a missed exit never follows a
  pupil into tomorrow. A passage of another day (a sibling's record delivered
  late, a board whose clock was wrong) changes nothing.
- Only passages that name a person move them: a card ``passage`` (``in`` ->
  inside, ``out`` -> outside) and, in fire mode, a card read
  (``access.granted`` with ``check: "none"``: the gate is free, the read is
  all there is). A free or button passage names nobody.
- Order: a passage changes a person only when it is newer than what is held
  for them, by (``ts``, gate id): the gate's own and its siblings' alike. So
  a late record cannot undo a later passage, the same record applied twice
  changes nothing, and every gate of a site that has applied the same
  passages holds the same presence, whatever order they arrived in.
- The roll-call: ``open_rollcall`` takes who is inside at the alarm (one per
  alarm: it stays open until ``close_rollcall``); while it is open every exit
  is noted as "left", an entry takes the person back out of "left".
- Bounded: at most MAX_PEOPLE people a day (a list of a school is far less;
  more means forged input) and ROLLCALL_LIST_MAX named in one record.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time
from typing import Any
from zoneinfo import ZoneInfo

from .records import parse_rfc3339

__all__ = [
    "DEFAULT_RESET",
    "FORMAT",
    "MAX_PEOPLE",
    "ROLLCALL_BY",
    "ROLLCALL_LIST_MAX",
    "SITE_ALARM_LATE_S",
    "Presence",
    "RollCall",
    "next_reset",
    "parse_reset",
    "passage_of",
    "presence_day",
    "record_wall",
]

FORMAT = 1
DEFAULT_RESET = "03:00"
MAX_PEOPLE = 100_000
ROLLCALL_LIST_MAX = 20_000  # a record of ~20,000 pseudonyms is ~400 KB: still one MQTT message
ROLLCALL_BY = ("fire_loop", "site")
# A sibling's alarm older than this when it arrives (a gate that was offline) opens no roll-call:
# the alarm is over or this gate has its own by then.
SITE_ALARM_LATE_S = 600.0
_RESET = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")


def parse_reset(text: object) -> int:
    """Minutes after local midnight of a "HH:MM" reset time; ValueError saying what is allowed."""
    m = _RESET.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"{text!r}: give the local time of the nightly reset as \"HH:MM\" (24 h), e.g. \"03:00\"")
    return int(m.group(1)) * 60 + int(m.group(2))


def presence_day(wall: float, tz: str, reset_minute: int) -> int:
    """The presence day (a date ordinal) that local time ``wall`` in ``tz`` belongs to: the day
    starts at the reset time, so 01:00 with a 03:00 reset still counts to the day before."""
    local = datetime.fromtimestamp(wall, ZoneInfo(tz))
    day = local.date().toordinal()
    return day if local.hour * 60 + local.minute >= reset_minute else day - 1


def next_reset(day: int, tz: str, reset_minute: int) -> float:
    """UTC epoch seconds at which presence day ``day`` ends (the next day's reset time)."""
    d = date.fromordinal(day + 1)
    at = datetime.combine(d, time(reset_minute // 60, reset_minute % 60), ZoneInfo(tz))
    return at.timestamp()


@dataclass
class RollCall:
    """One alarm's roll-call: who was inside, who left since, who came in since."""

    started: float  # wall s of the alarm
    by: str  # fire_loop (this gate's loop) or site (a sibling's alarm)
    gate: str  # the gate whose alarm it is
    inside: tuple[str, ...]  # inside at the alarm, sorted
    left: dict[str, float] = field(default_factory=dict)  # person -> wall s of the exit
    entered: dict[str, float] = field(default_factory=dict)  # came in during the alarm
    ended: float | None = None  # wall s of the fire reset; None while open

    @property
    def active(self) -> bool:
        return self.ended is None

    def not_seen_leaving(self) -> list[str]:
        """Inside at the alarm or entered since, and not seen leaving: whom to look for."""
        return sorted((set(self.inside) | set(self.entered)) - set(self.left))

    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "by": self.by, "gate": self.gate, "inside": list(self.inside),
                "left": dict(sorted(self.left.items())), "entered": dict(sorted(self.entered.items())),
                "ended": self.ended}

    @classmethod
    def from_dict(cls, d: Any) -> RollCall:
        if not isinstance(d, dict):
            raise ValueError("rollcall is not an object")  # noqa: TRY004 - one error type for a bad file
        started, ended = d.get("started"), d.get("ended")
        if not _wall_ok(started) or not (ended is None or _wall_ok(ended)):
            raise ValueError("rollcall started/ended are not times")
        if d.get("by") not in ROLLCALL_BY or not isinstance(d.get("gate"), str):
            raise ValueError("rollcall by/gate")
        inside = d.get("inside")
        if not isinstance(inside, list) or not all(_person_ok(p) for p in inside):
            raise ValueError("rollcall inside is not a list of person ids")
        return cls(float(started), d["by"], d["gate"], tuple(sorted(set(inside))),
                   _times(d.get("left")), _times(d.get("entered")),
                   None if ended is None else float(ended))


@dataclass
class _Seen:
    inside: bool
    wall: float
    gate: str  # the gate it passed


class Presence:
    """Who is inside now, per presence day, and the current or last roll-call.

    reset: the nightly reset, "HH:MM" local. ``revision`` grows at every change
    (the service saves the file when it moved); ``urgent`` is set when the
    roll-call opened or closed (saved at once).
    """

    def __init__(self, reset: str = DEFAULT_RESET) -> None:
        self.reset = reset
        self.reset_minute = parse_reset(reset)
        self.day: int | None = None
        self.timezone: str | None = None
        self.people: dict[str, _Seen] = {}
        self.rollcall: RollCall | None = None
        self.dropped = 0  # people not tracked: over MAX_PEOPLE in one day
        self.revision = 0
        self.urgent = False
        self._window: tuple[str, float, float] | None = None  # (tz, start, end) of the current day

    # --- time -------------------------------------------------------------------------

    def roll(self, wall: float, tz: str) -> bool:
        """Enter the presence day of ``wall``; True when that cleared the day before.
        A day that moves backwards (a clock set back across the reset) clears too: an
        empty presence refuses nobody."""
        w = self._window
        if w is not None and w[0] == tz and w[1] <= wall < w[2]:
            return False  # the usual case, on every event: no time-zone arithmetic
        try:
            day = presence_day(wall, tz, self.reset_minute)
            window = (tz, next_reset(day - 1, tz, self.reset_minute), next_reset(day, tz, self.reset_minute))
        except (OverflowError, ValueError, OSError):
            # A wall clock beyond what a date can hold (year 10000): presence waits for a sane
            # one; the gate itself goes on (this runs in the same step as a fire loop's release).
            return False
        self.timezone = tz
        self._window = window
        if day == self.day:
            return False
        cleared = self.day is not None and bool(self.people)
        self.day = day
        self.people.clear()
        self.dropped = 0
        self.revision += 1
        return cleared

    @property
    def resets_at(self) -> float | None:
        """Wall s at which the current presence day ends (None before the first roll)."""
        if self.day is None or self.timezone is None:
            return None
        try:
            return next_reset(self.day, self.timezone, self.reset_minute)
        except (OverflowError, ValueError, OSError):
            return None

    # --- passages ----------------------------------------------------------------------

    def apply(self, person: str, inside: bool, wall: float, tz: str, gate: str = "") -> bool:
        """One passage of ``person`` (inside=True: entered) at ``wall`` through ``gate`` (its id).
        False when it changed nothing: another presence day, not newer by (wall, gate) than
        what is held for the person (the same record again), or over MAX_PEOPLE."""
        if not _person_ok(person) or not _wall_ok(wall):
            return False
        try:
            if self.day is None or presence_day(wall, tz, self.reset_minute) != self.day:
                return False
        except (OverflowError, ValueError, OSError):
            return False
        if not isinstance(gate, str):
            return False
        prev = self.people.get(person)
        if prev is not None:
            if (wall, gate) <= (prev.wall, prev.gate):
                return False  # older news (or the same record again): the newest passage wins
        elif len(self.people) >= MAX_PEOPLE:
            self.dropped += 1
            return False
        self.people[person] = _Seen(bool(inside), float(wall), gate)
        rc = self.rollcall
        if rc is not None and rc.active:
            if inside:
                rc.left.pop(person, None)
                if person not in rc.inside:
                    rc.entered[person] = float(wall)
            else:
                rc.left[person] = float(wall)
        self.revision += 1
        return True

    def apply_record(self, rec: Any, tz: str, gate: str = "") -> bool:
        """A contract record (own or a sibling's): a card ``passage`` or a fire-mode read
        moves its person; anything else, or a malformed record, changes nothing."""
        person, inside = passage_of(rec)
        if person is None:
            return False
        wall = record_wall(rec)
        return wall is not None and self.apply(person, inside, wall, tz, gate)

    # --- views -------------------------------------------------------------------------

    def inside(self) -> list[str]:
        """Who is inside now, sorted."""
        return sorted(p for p, s in self.people.items() if s.inside)

    def counts(self) -> dict[str, int]:
        inside = sum(1 for s in self.people.values() if s.inside)
        return {"inside": inside, "seen": len(self.people), "left": len(self.people) - inside}

    # --- roll-call ---------------------------------------------------------------------

    def open_rollcall(self, wall: float, by: str, gate: str) -> dict[str, Any] | None:
        """Start a roll-call at ``wall``: the fields of its ``rollcall`` record, or None when
        one is already open (one per alarm)."""
        if self.rollcall is not None and self.rollcall.active:
            return None
        if by not in ROLLCALL_BY:
            raise ValueError(f"roll-call by {by!r}; allowed: {', '.join(ROLLCALL_BY)}")
        inside = self.inside()
        self.rollcall = RollCall(float(wall), by, gate, tuple(inside))
        self.revision += 1
        self.urgent = True
        fields: dict[str, Any] = {"by": by, "gate": gate, "count": len(inside),
                                  "inside": inside[:ROLLCALL_LIST_MAX]}
        if len(inside) > ROLLCALL_LIST_MAX:
            fields["truncated"] = True
        return fields

    def close_rollcall(self, wall: float, gate: str | None = None) -> bool:
        """End the open roll-call (the fire reset); with ``gate``, only one that gate's alarm
        opened. True when one was closed. It stays readable until the next alarm."""
        rc = self.rollcall
        if rc is None or not rc.active or (gate is not None and rc.gate != gate):
            return False
        rc.ended = float(wall)
        self.revision += 1
        self.urgent = True
        return True

    # --- on disk -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the service writes (agent/presencefile.py) and the tools read."""
        day = None if self.day is None else date.fromordinal(self.day).isoformat()
        return {
            "format": FORMAT,
            "reset": self.reset,
            "timezone": self.timezone,
            "day": day,
            "resets_at": self.resets_at,
            "people": {p: [int(s.inside), s.wall, s.gate] for p, s in sorted(self.people.items())},
            "dropped": self.dropped,
            "rollcall": None if self.rollcall is None else self.rollcall.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, reset: str = DEFAULT_RESET) -> Presence:
        """The presence a to_dict() gave; ValueError when it is not one. ``reset`` is the
        configured one (it may have changed since): the next roll() applies it."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a presence file of format {FORMAT}")
        p = cls(reset)
        tz, day = d.get("timezone"), d.get("day")
        if day is not None:
            if not isinstance(day, str) or not isinstance(tz, str):
                raise ValueError("day/timezone")
            p.day = date.fromisoformat(day).toordinal()
            p.timezone = tz
            try:
                ZoneInfo(tz)
            except (KeyError, ValueError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
                raise ValueError(f"time zone {tz!r}") from exc
        people = d.get("people")
        if not isinstance(people, dict) or len(people) > MAX_PEOPLE:
            raise ValueError("people is not an object of at most MAX_PEOPLE entries")
        for person, v in people.items():
            if (not _person_ok(person) or not isinstance(v, list) or len(v) != 3 or v[0] not in (0, 1)
                    or not _wall_ok(v[1]) or not isinstance(v[2], str)):
                raise ValueError(f"people entry {person!r}")
            p.people[person] = _Seen(bool(v[0]), float(v[1]), v[2])
        if d.get("rollcall") is not None:
            p.rollcall = RollCall.from_dict(d["rollcall"])
        return p


# --- record fields (own and siblings') ---------------------------------------------------


def passage_of(rec: Any) -> tuple[str | None, bool]:
    """(person, inside) of a record that moves a named person, else (None, False)."""
    if not isinstance(rec, dict):
        return None, False
    rtype = rec.get("type")
    if rtype == "passage":
        if rec.get("source") != "card":
            return None, False
    elif not (rtype == "access.granted" and rec.get("check") == "none"):
        return None, False
    person, direction = rec.get("person"), rec.get("direction")
    if not _person_ok(person) or direction not in ("in", "out"):
        return None, False
    return person, direction == "in"


def record_wall(rec: Any) -> float | None:
    """A record's ``ts`` as epoch seconds, or None when it has none readable."""
    ts = rec.get("ts") if isinstance(rec, dict) else None
    if not isinstance(ts, str) or len(ts) > 40:
        return None
    try:
        return parse_rfc3339(ts).timestamp()
    except (ValueError, OverflowError):
        return None


def _person_ok(p: object) -> bool:
    return isinstance(p, str) and 0 < len(p) <= 128


def _wall_ok(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _times(d: Any) -> dict[str, float]:
    if d is None:
        return {}
    if not isinstance(d, dict) or not all(_person_ok(k) and _wall_ok(v) for k, v in d.items()):
        raise ValueError("a roll-call list is not person -> time")
    return {k: float(v) for k, v in d.items()}
