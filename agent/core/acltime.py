"""Time in the access list: weekly schedules as minute bitmaps, dates, validity
epochs in the list's own time zone. Pure: ``zoneinfo`` for the zones, no clock.
"""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastpath.codes import (
    BITMAP_BYTES,
    MINUTES_PER_WEEK,
)

from .records import parse_rfc3339

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
_ALL_MINUTES = (1 << MINUTES_PER_WEEK) - 1


# --------------------------------------------------------------------------- time


def minute_of_week(local_dt: datetime) -> int:
    """Minute of the week of a local wall time: Monday 00:00 is 0, Sunday 23:59 is 10079."""
    return local_dt.weekday() * 1440 + local_dt.hour * 60 + local_dt.minute


def _range_minutes(text: str) -> tuple[int, int]:
    """ "07:00-08:30" -> (420, 510): start inclusive, end exclusive."""
    a, b = text.split("-")
    return int(a[:2]) * 60 + int(a[3:]), int(b[:2]) * 60 + int(b[3:])


def schedule_bitmap(schedule: dict) -> bytes:
    """A schedule's week as codes.BITMAP_BYTES bytes: bit i (byte i//8, mask
    1 << i%8) set when minute i of the week (Monday 00:00 = 0) is open."""
    bits = 0
    week = schedule.get("week") or {}
    for d, day in enumerate(WEEKDAYS):
        for text in week.get(day) or ():
            start, end = _range_minutes(text)
            if end > start:
                bits |= ((1 << (end - start)) - 1) << (d * 1440 + start)
    # Little-endian int bytes: bit i of the int is bit i % 8 of byte i // 8.
    return bits.to_bytes(BITMAP_BYTES, "little")


def _parse_date(text: str) -> date:
    return date.fromisoformat(text)




def _is_date(text: str) -> bool:
    return len(text) == 10


class _Epochs:
    """Validity strings to UTC epoch seconds in one time zone, cached (many
    people share a date). A date starts at its local midnight; as an end it
    means the whole local day, so it maps to the next local midnight."""

    def __init__(self, tz: ZoneInfo) -> None:
        self.tz = tz
        self._start: dict[str, int] = {}
        self._end: dict[str, int] = {}

    def _midnight(self, d: date) -> int:
        return math.floor(datetime(d.year, d.month, d.day, tzinfo=self.tz).timestamp())

    def start(self, text: str) -> int:
        v = self._start.get(text)
        if v is None:
            if _is_date(text):
                v = self._midnight(_parse_date(text))
            else:
                v = math.floor(parse_rfc3339(text).timestamp())
            self._start[text] = v
        return v

    def end(self, text: str) -> int:
        v = self._end.get(text)
        if v is None:
            if _is_date(text):
                v = self._midnight(_parse_date(text) + timedelta(days=1))
            else:
                v = math.floor(parse_rfc3339(text).timestamp())
            self._end[text] = v
        return v


def _zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None
