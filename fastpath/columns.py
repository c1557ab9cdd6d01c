"""TableColumns: the compiled access list as plain columns.

agent.core.acl turns a validated access-list document into one TableColumns;
each fastpath twin builds its own immutable Table from it. Columns are
`array.array`s (compact, and the compiled twin copies them into C memory).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TableColumns:
    version: str
    key_width: int = 24
    # Cards, sorted ascending by key, unique.
    card_keys: array = field(default_factory=lambda: array("Q"))
    card_person: array = field(default_factory=lambda: array("i"))  # person index; -1: blocked card of nobody
    card_flags: array = field(default_factory=lambda: array("B"))  # codes.CARD_BLOCKED
    # Persons (people and guests), by index.
    person_ids: list[str] = field(default_factory=list)  # pseudonymous ids
    person_from: array = field(default_factory=lambda: array("q"))  # UTC epoch s, inclusive; codes.NO_START
    person_until: array = field(default_factory=lambda: array("q"))  # UTC epoch s, exclusive; codes.NO_END
    person_groupset: array = field(default_factory=lambda: array("i"))  # index into gs_* lists
    person_flags: array = field(default_factory=lambda: array("B"))  # codes.PERSON_GUEST
    person_max_uses: array = field(default_factory=lambda: array("i"))  # guests: entries allowed; 0: unlimited
    # Group sets: each the OR of its groups' weekly schedules, codes.BITMAP_BYTES each.
    gs_entry: list[bytes] = field(default_factory=list)  # entry allowed, ordinary day
    gs_entry_holiday: list[bytes] = field(default_factory=list)  # entry allowed on a holiday
    gs_exit: list[bytes] = field(default_factory=list)  # exit allowed (any day)
    holidays: array = field(default_factory=lambda: array("i"))  # sorted local date ordinals
