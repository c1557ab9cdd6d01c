"""A synthetic access list of any size, for benchmarks and soak tests.

``synthetic_acl(n_cards)`` is a valid snapshot (docs/access-list.md) with
n_cards cards: one card per person in the three card forms in turn, a few
groups and schedules, 0.1% blocked cards, a few guests and holidays.
"""

from __future__ import annotations

from typing import Any

from agent.core.acl import WEEKDAYS

__all__ = ["synthetic_acl"]


def synthetic_acl(n_cards: int, *, seed: int = 1, version: str = "synthetic.1") -> dict:
    """A valid snapshot with n_cards cards (for benchmarks and soak tests).

    One card per person, in the three card forms in turn, a few groups and
    schedules, 0.1% blocked cards, a few guests and holidays. Keys are
    distinct: n_cards must fit in the 24-bit key space of this list."""
    if not 0 <= n_cards < (1 << 24) - (1 << 15):
        raise ValueError(
            f"n_cards {n_cards} does not fit 24-bit keys; use fewer than {(1 << 24) - (1 << 15)}"
        )
    # i -> (i * odd + offset) mod 2**24 is a bijection: distinct, scattered keys, no RNG needed.
    mult, offset = 0x9E3779 | 1, (seed * 0x5BD1E9) & 0xFFFFFF
    wanted = n_cards + n_cards // 1000 + 1
    keys = [k for k in (((i + 1) * mult + offset) & 0xFFFFFF for i in range(wanted + 1)) if k][
        :wanted
    ]
    lessons = {
        "mon": ["12:00-19:00"],
        "tue": ["12:00-19:00"],
        "wed": ["12:00-19:00"],
        "thu": ["12:00-19:00"],
        "fri": ["12:00-19:00"],
    }
    day = {d: ["07:00-19:00"] for d in WEEKDAYS[:6]}
    doc: dict[str, Any] = {
        "kind": "snapshot",
        "version": version,
        "timezone": "Asia/Tomsk",
        "key_width": 24,
        "schedules": {
            "school-day": {"week": day},
            "after-lessons": {"week": lessons},
            "staff": {"holidays": True, "week": {d: ["06:00-22:00"] for d in WEEKDAYS}},
        },
        "groups": {
            "junior": {"entry": "school-day", "exit": "after-lessons"},
            "senior": {"entry": "school-day", "exit": None},
            "staff": {"entry": "staff", "exit": None},
        },
        "people": [],
        "guests": [],
        "blocked": [],
        "holidays": ["2026-11-04", "2026-12-31"],
    }
    group_cycle = (["junior"], ["senior"], ["staff"], ["junior", "senior"])
    people = doc["people"]
    n_guests = min(10, n_cards // 100)
    for i in range(n_cards - n_guests):
        k = keys[i]
        form = i % 3
        card = (
            f"{k >> 16},{k & 0xFFFF}"
            if form == 0
            else (f"{k:010d}" if form == 1 else f"hex:{k:06X}")
        )
        p: dict[str, Any] = {"id": f"p-{i:07x}", "cards": [card], "groups": group_cycle[i % 4]}
        if i % 5 == 0:
            p["valid_until"] = "2027-06-30"
        people.append(p)
    for j in range(n_guests):
        k = keys[n_cards - n_guests + j]
        doc["guests"].append(
            {
                "id": f"g-{j:04d}",
                "card": f"{k:010d}",
                "from": "2026-09-01T07:00:00+07:00",
                "until": "2026-09-30T20:00:00+07:00",
                "uses": 1,
            }
        )
    for k in keys[n_cards:]:
        doc["blocked"].append(f"{k:010d}")
    return doc
