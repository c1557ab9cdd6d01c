"""GateConfig: how one turnstile is wired and how its lane behaves.

Pure data, checked on construction: a bad value raises GateConfigError naming
every bad field at once with what is allowed (the mqtt-io habit), so a
technician fixes the whole config in one go.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agent.core.events import PULSE_MIN_S as MIN_PULSE_S  # the turnstile's control inputs: 100 ms
from agent.core.presence import parse_reset
from agent.core.problems import ProblemsError
from fastpath import codes

RELAY_MODES = ("pulse", "potential")
# Fire is entered only through the fire loop, never configured.
INITIAL_MODES = tuple(m for m in codes.MODES if m != "fire")
MAX_WAIT_S = 60.0  # the turnstile itself faults a passage stalled over 30 s
# site and gate are MQTT topic levels (agent.contract.topics): no separators or wildcards.
_TOPIC_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")


class GateConfigError(ProblemsError):
    """One or more bad gate settings; ``errors`` is a list of (field, message)."""

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__(f"invalid gate config ({len(errors)} problem(s)); fix these settings:",
                         [f"{name}: {msg}" for name, msg in errors])


def _default_readers() -> Mapping[str, str]:
    return {"entry": "in", "exit": "out"}


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class GateConfig:
    site: str = "site"
    gate: str = "gate"
    # reader name -> direction ("in" or "out"); the reader fixes a card's direction
    readers: Mapping[str, str] = field(default_factory=_default_readers, hash=False)
    relay_mode: str = "pulse"  # "pulse": one pulse opens one passage; "potential": held while open
    pulse_s: float = 0.3
    wait_s: float = 5.0  # the turnstile's own wait: 5 s on a TTR-04, 8 s on a TTR-10A
    apb: str = "off"  # anti-passback: off, soft, hard, timed
    apb_window_min: int = 0  # for "timed": minutes before the same person may enter again
    fire_release: bool = True  # a fire-release relay is wired to the turnstile's Fire Alarm input
    timezone: str = "UTC"  # for schedules, when the access list names none
    initial_mode: str = "normal"
    presence_reset: str = "03:00"  # local time presence starts afresh each night (docs/presence.md)

    def __post_init__(self) -> None:
        # Freeze the reader map so the config really is immutable.
        if isinstance(self.readers, Mapping):
            object.__setattr__(self, "readers", MappingProxyType(dict(self.readers)))
        self.validate()

    def validate(self) -> None:
        """Raise GateConfigError listing every bad field with what is allowed."""
        errors: list[tuple[str, str]] = []

        def bad(name: str, message: str) -> None:
            errors.append((name, message))

        for name in ("site", "gate"):
            v = getattr(self, name)
            if not isinstance(v, str) or not _TOPIC_LEVEL.fullmatch(v):
                bad(name, f"{v!r} is not allowed: use 1 to 64 letters, digits, '_' or '-' "
                          "(it is an MQTT topic level)")
        if not isinstance(self.readers, Mapping) or not self.readers:
            bad("readers", f"{self.readers!r}: give at least one reader as name -> direction, "
                           'e.g. {entry = "in", exit = "out"}')
        else:
            for name, direction in self.readers.items():
                if not isinstance(name, str) or not name:
                    bad("readers", f"reader name {name!r} must be a non-empty string")
                if direction not in codes.DIRECTIONS:
                    bad(f"readers.{name}", f'direction {direction!r}; allowed: "in", "out"')
        if self.relay_mode not in RELAY_MODES:
            bad("relay_mode", f'{self.relay_mode!r}; allowed: "pulse", "potential"')
        wait_ok = _is_number(self.wait_s) and 0 < self.wait_s <= MAX_WAIT_S
        if not wait_ok:
            bad("wait_s", f"{self.wait_s!r}; allowed: seconds, more than 0 and at most "
                          f"{MAX_WAIT_S:g} (5.0 on a TTR-04, 8.0 on a TTR-10A)")
        if not _is_number(self.pulse_s) or self.pulse_s < MIN_PULSE_S:
            bad("pulse_s", f"{self.pulse_s!r}; allowed: at least {MIN_PULSE_S} s "
                           "(the turnstile needs a 100 ms pulse)")
        elif wait_ok and self.pulse_s > self.wait_s:
            bad("pulse_s", f"{self.pulse_s!r} is longer than wait_s ({self.wait_s!r}); "
                           "a pulse must end within the passage wait")
        if self.apb not in codes.APB_MODES:
            bad("apb", f"{self.apb!r}; allowed: {', '.join(codes.APB_MODES)}")
        window = self.apb_window_min
        if not isinstance(window, int) or isinstance(window, bool) or window < 0:
            bad("apb_window_min", f"{window!r}; allowed: whole minutes, 0 or more")
        elif self.apb == "timed" and window == 0:
            bad("apb_window_min", 'apb = "timed" needs a window of at least 1 minute')
        if not isinstance(self.fire_release, bool):
            bad("fire_release", f"{self.fire_release!r}; allowed: true or false")
        if not valid_timezone(self.timezone):
            bad("timezone", f"{self.timezone!r} is not a known IANA time zone; "
                            'use a name like "Europe/Moscow" or "UTC"')
        if self.initial_mode not in INITIAL_MODES:
            bad("initial_mode", f"{self.initial_mode!r}; allowed: {', '.join(INITIAL_MODES)} "
                                "(fire is entered only through the fire loop)")
        if not _valid_reset(self.presence_reset):
            bad("presence_reset", f'{self.presence_reset!r}; allowed: the local time of the nightly '
                                  'presence reset as "HH:MM" (24 h), e.g. "03:00"')
        if errors:
            raise GateConfigError(errors)

    @property
    def apb_window_s(self) -> int:
        return self.apb_window_min * 60

    def direction_of(self, reader: str) -> str | None:
        """The direction of a configured reader, None for a reader not in the config."""
        return self.readers.get(reader)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def _valid_reset(text: object) -> bool:
    try:
        parse_reset(text)
    except ValueError:
        return False
    return True


def valid_timezone(name: object) -> bool:
    if not isinstance(name, str) or not name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True
