"""The fastpath card table, gate state and access decision, on both twins.

Every test takes the `fp` fixture (tests/conftest.py), so each runs against
fastpath._pure and fastpath._compiled. Tables are built by hand here (not via
agent.core.acl) so these tests pin the fastpath alone.
"""

from __future__ import annotations

import json
import os
from array import array
from dataclasses import dataclass, field

import pytest

from fastpath import codes
from fastpath.codes import (
    ANTIPASSBACK,
    APB_HARD,
    APB_OFF,
    APB_SOFT,
    APB_TIMED,
    BITMAP_BYTES,
    BLOCKED,
    ENTRY_ONLY,
    EXIT_RESTRICTED,
    EXPIRED,
    FIRE,
    FREE,
    GATE_BUSY,
    GRANTED,
    HOLIDAY,
    IN,
    LOCKDOWN,
    LOCKDOWN_DENIED,
    MINUTES_PER_WEEK,
    NO_END,
    NO_START,
    NORMAL,
    NOT_YET_VALID,
    OUT,
    OUTSIDE_SCHEDULE,
    POS_IN,
    POS_OUT,
    POS_UNKNOWN,
    UNKNOWN_CARD,
    WARN_ANTIPASSBACK,
    WARN_NONE,
    WRONG_DIRECTION,
)
from fastpath.columns import TableColumns

# --------------------------------------------------------------------------- helpers

MON, TUE, SAT = 0, 1, 5
DAY = 738_000  # a local date ordinal used as "today"
HOLIDAY_DAY = DAY + 10
NOW = 1_700_000_000  # UTC epoch seconds


def minute(weekday: int, hh: int, mm: int = 0) -> int:
    return weekday * 1440 + hh * 60 + mm


MONDAY_10AM = minute(MON, 10)


def bitmap(*spans: tuple[int, int]) -> bytes:
    """A weekly bitmap with the minutes of each [start, end) span set."""
    bits = bytearray(BITMAP_BYTES)
    for start, end in spans:
        for m in range(start, end):
            bits[m // 8] |= 1 << (m % 8)
    return bytes(bits)


def weekdays(h_from: int, h_to: int) -> list[tuple[int, int]]:
    return [(minute(d, h_from), minute(d, h_to)) for d in range(5)]


ALWAYS = bitmap((0, MINUTES_PER_WEEK))
NEVER = bitmap()


@dataclass
class Group:
    entry: bytes = ALWAYS
    entry_holiday: bytes = NEVER
    exit: bytes = ALWAYS


@dataclass
class Person:
    id: str
    cards: list[int]
    groups: list[str] = field(default_factory=lambda: ["all"])
    valid_from: int = NO_START
    valid_until: int = NO_END
    guest: bool = False
    max_uses: int = 0


def build(
    fp,
    persons: list[Person],
    groups: dict[str, Group] | None = None,
    blocked: list[int] = (),
    holidays: list[int] = (HOLIDAY_DAY,),
    version: str = "v1",
    key_width: int = 24,
):
    """A Table of `fp` from a readable description.

    A groupset is the OR of its groups' bitmaps (what agent.core.acl does), so a
    person in several groups passes when any group allows it.
    """
    groups = {"all": Group()} if groups is None else groups
    sets: dict[tuple[str, ...], int] = {}
    gs_entry, gs_holiday, gs_exit = [], [], []

    def union(bitmaps: list[bytes]) -> bytes:
        out = bytearray(BITMAP_BYTES)
        for bm in bitmaps:
            for i, b in enumerate(bm):
                out[i] |= b
        return bytes(out)

    cards: dict[int, tuple[int, int]] = {}
    cols = {
        "person_ids": [],
        "person_from": [],
        "person_until": [],
        "person_groupset": [],
        "person_flags": [],
        "person_max_uses": [],
    }
    for index, p in enumerate(persons):
        names = tuple(sorted(p.groups))
        if names not in sets:
            sets[names] = len(gs_entry)
            gs_entry.append(union([groups[n].entry for n in names]))
            gs_holiday.append(union([groups[n].entry_holiday for n in names]))
            gs_exit.append(union([groups[n].exit for n in names]))
        cols["person_ids"].append(p.id)
        cols["person_from"].append(p.valid_from)
        cols["person_until"].append(p.valid_until)
        cols["person_groupset"].append(sets[names])
        cols["person_flags"].append(codes.PERSON_GUEST if p.guest else 0)
        cols["person_max_uses"].append(p.max_uses)
        for key in p.cards:
            cards[key] = (index, 0)
    for key in blocked:
        person = cards.get(key, (-1, 0))[0]
        cards[key] = (person, codes.CARD_BLOCKED)
    keys = sorted(cards)
    columns = TableColumns(
        version=version,
        key_width=key_width,
        card_keys=array("Q", keys),
        card_person=array("i", [cards[k][0] for k in keys]),
        card_flags=array("B", [cards[k][1] for k in keys]),
        person_ids=cols["person_ids"],
        person_from=array("q", cols["person_from"]),
        person_until=array("q", cols["person_until"]),
        person_groupset=array("i", cols["person_groupset"]),
        person_flags=array("B", cols["person_flags"]),
        person_max_uses=array("i", cols["person_max_uses"]),
        gs_entry=gs_entry,
        gs_entry_holiday=gs_holiday,
        gs_exit=gs_exit,
        holidays=array("i", sorted(holidays)),
    )
    return fp.Table(columns)


def decide(
    fp,
    table,
    state,
    key,
    direction=IN,
    *,
    mode=NORMAL,
    epoch_s=NOW,
    at=MONDAY_10AM,
    day=DAY,
    busy=False,
    apb=APB_OFF,
    window=0,
):
    """fp.decide with the defaults of an ordinary Monday morning."""
    return fp.decide(table, state, key, direction, mode, epoch_s, at, day, busy, apb, window)


ALICE = Person("p-alice", [100, 101])
BOB = Person("p-bob", [200])


# --------------------------------------------------------------------------- twins


def test_the_compiled_twins_c_constants_agree_with_codes():
    compiled = pytest.importorskip("fastpath._compiled")
    consts = compiled._c_constants()
    assert len(consts) > 20
    derived = {"N_MODES": len(codes.MODES), "N_APB_MODES": len(codes.APB_MODES)}
    for name, value in consts.items():
        assert value == derived.get(name, getattr(codes, name, None)), name


def test_compiled_twin_is_loaded_when_required():
    if os.environ.get("GATE_REQUIRE_COMPILED", "") not in ("1", "true", "yes"):
        pytest.skip("set GATE_REQUIRE_COMPILED=1 to check the selector picks the compiled twin")
    import fastpath._compiled

    import fastpath

    assert fastpath.IMPLEMENTATION == "compiled"
    assert fastpath.Table is fastpath._compiled.Table
    assert fastpath.decide is fastpath._compiled.decide
    assert fastpath.GateState is fastpath._compiled.GateState


# --------------------------------------------------------------------------- table


def test_table_answers_lookups(fp):
    guest = Person("g-1", [300], guest=True, max_uses=1)
    t = build(fp, [ALICE, BOB, guest], blocked=[101, 999], version="2024-09-01.3", key_width=26)
    assert len(t) == 5  # 100, 101, 200, 300 and the blocked card of nobody 999
    assert t.version == "2024-09-01.3"
    assert t.key_width == 26
    assert t.persons == 3
    alice, bob = t.lookup(100), t.lookup(200)
    assert t.person_id(alice) == "p-alice" and t.person_id(bob) == "p-bob"
    assert t.lookup(101) == alice  # a blocked card still names its owner
    assert t.lookup(999) == -1 and t.lookup(555) == -1
    assert t.is_blocked(101) and t.is_blocked(999)
    assert not t.is_blocked(100) and not t.is_blocked(555)
    assert t.is_guest(t.lookup(300)) and not t.is_guest(alice)
    assert t.nbytes() > 0


def test_person_index_out_of_range_is_index_error(fp):
    t = build(fp, [ALICE])
    for bad in (-1, 1):
        with pytest.raises(IndexError):
            t.person_id(bad)
        with pytest.raises(IndexError):
            t.is_guest(bad)


def test_keys_outside_64_bits_are_unknown_not_errors(fp):
    top = 2**64 - 1
    t = build(fp, [Person("p-wide", [0, top])], key_width=64)
    assert t.lookup(top) == 0 and t.lookup(0) == 0
    for key in (-1, -(2**70), 2**64, 2**100):
        assert t.lookup(key) == -1
        assert not t.is_blocked(key)
        assert decide(fp, t, fp.GateState(), key) == (UNKNOWN_CARD, -1, WARN_NONE)


def test_float_key_is_a_type_error(fp):
    t = build(fp, [ALICE])
    with pytest.raises(TypeError):
        t.lookup(100.0)


def test_empty_table_knows_no_card(fp):
    t = fp.Table(TableColumns(version=""))
    assert len(t) == 0 and t.persons == 0 and t.version == ""
    assert t.lookup(100) == -1 and not t.is_blocked(100)
    state = fp.GateState()
    for direction in (IN, OUT):
        assert decide(fp, t, state, 100, direction) == (UNKNOWN_CARD, -1, WARN_NONE)
    assert decide(fp, t, state, 100, mode=FIRE) == (GRANTED, -1, WARN_NONE)


def test_plain_lists_are_accepted_as_columns(fp):
    cols = TableColumns(
        version="v",
        card_keys=[5],
        card_person=[0],
        card_flags=[0],
        person_ids=["p"],
        person_from=[NO_START],
        person_until=[NO_END],
        person_groupset=[0],
        person_flags=[0],
        person_max_uses=[0],
        gs_entry=[ALWAYS],
        gs_entry_holiday=[NEVER],
        gs_exit=[ALWAYS],
    )
    t = fp.Table(cols)
    assert decide(fp, t, fp.GateState(), 5) == (GRANTED, 0, WARN_NONE)


def _good_columns(**changes) -> TableColumns:
    base = {
        "version": "v",
        "card_keys": array("Q", [5, 9]),
        "card_person": array("i", [0, -1]),
        "card_flags": array("B", [0, codes.CARD_BLOCKED]),
        "person_ids": ["p"],
        "person_from": array("q", [NO_START]),
        "person_until": array("q", [NO_END]),
        "person_groupset": array("i", [0]),
        "person_flags": array("B", [0]),
        "person_max_uses": array("i", [0]),
        "gs_entry": [ALWAYS],
        "gs_entry_holiday": [NEVER],
        "gs_exit": [ALWAYS],
        "holidays": array("i", [1, 2]),
    }
    base.update(changes)
    return TableColumns(**base)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"card_person": array("i", [0])}, "differ in length"),
        ({"card_flags": array("B", [0, 0, 0])}, "differ in length"),
        ({"person_ids": ["p", "q"]}, "differ in length"),
        ({"gs_exit": []}, "differ in length"),
        ({"card_keys": array("Q", [9, 5])}, "sorted"),
        ({"card_keys": array("Q", [5, 5])}, "sorted"),
        ({"holidays": array("i", [2, 1])}, "sorted"),
        ({"card_person": array("i", [0, 1])}, "card_person"),
        ({"card_person": array("i", [0, -2])}, "card_person"),
        ({"person_groupset": array("i", [1])}, "person_groupset"),
        ({"person_max_uses": array("i", [-1])}, "person_max_uses"),
        ({"gs_entry": [ALWAYS[:-1]]}, "bytes"),
        ({"person_ids": [7]}, "person_ids"),
        ({"gs_exit": [BITMAP_BYTES]}, "gs_exit"),
        ({"card_keys": [5, -9]}, "card_keys"),
        ({"key_width": 65}, "key_width"),
    ],
)
def test_inconsistent_columns_are_refused_with_the_column_named(fp, changes, words):
    with pytest.raises(ValueError, match=words):
        fp.Table(_good_columns(**changes))


def test_table_needs_table_columns(fp):
    with pytest.raises(TypeError, match="TableColumns"):
        fp.Table({"version": "v"})


def test_table_does_not_change_when_columns_change_afterwards(fp):
    cols = _good_columns()
    t = fp.Table(cols)
    cols.card_person[0] = -1
    cols.person_until[0] = 0
    assert decide(fp, t, fp.GateState(), 5) == (GRANTED, 0, WARN_NONE)


def test_a_table_cannot_be_rebuilt_in_place(fp):
    t = fp.Table(_good_columns())
    with pytest.raises(TypeError, match="immutable"):
        t.__init__(TableColumns(version="other"))
    assert t.version == "v" and t.lookup(5) == 0


# --------------------------------------------------------------------------- modes


def test_fire_grants_every_card_without_a_check(fp):
    gone = Person("p-gone", [300], valid_until=NOW - 1)
    t = build(fp, [ALICE, gone], blocked=[101, 999])
    state = fp.GateState()
    for key in (100, 101, 300, 999, 555):
        for direction in (IN, OUT):
            result, idx, warning = decide(fp, t, state, key, direction, mode=FIRE, busy=True)
            assert (result, idx, warning) == (GRANTED, t.lookup(key), WARN_NONE)


def test_lockdown_refuses_every_card_both_ways(fp):
    t = build(fp, [ALICE], blocked=[101, 999])
    for key in (100, 101, 999, 555):
        for direction in (IN, OUT):
            result, idx, _ = decide(fp, t, fp.GateState(), key, direction, mode=LOCKDOWN, busy=True)
            assert (result, idx) == (LOCKDOWN_DENIED, t.lookup(key))


def test_entry_only_refuses_exits_before_any_card_check(fp):
    t = build(fp, [ALICE], blocked=[101])
    state = fp.GateState()
    for key in (100, 101, 555):
        assert decide(fp, t, state, key, OUT, mode=ENTRY_ONLY)[0] == WRONG_DIRECTION
    assert decide(fp, t, state, 100, IN, mode=ENTRY_ONLY) == (GRANTED, 0, WARN_NONE)
    assert decide(fp, t, state, 101, IN, mode=ENTRY_ONLY)[0] == BLOCKED


def test_free_mode_decides_cards_as_normal(fp):
    t = build(fp, [ALICE], blocked=[101])
    state = fp.GateState()
    for key in (100, 101, 555):
        for direction in (IN, OUT):
            assert decide(fp, t, state, key, direction, mode=FREE) == decide(
                fp, t, state, key, direction, mode=NORMAL
            )


# --------------------------------------------------------------------------- cards


def test_blocked_beats_unknown(fp):
    t = build(fp, [ALICE], blocked=[101, 999])
    state = fp.GateState()
    assert decide(fp, t, state, 999) == (BLOCKED, -1, WARN_NONE)  # blocked card of nobody
    assert decide(fp, t, state, 101) == (BLOCKED, 0, WARN_NONE)  # Alice's lost card
    assert decide(fp, t, state, 100) == (GRANTED, 0, WARN_NONE)  # her other card works
    assert decide(fp, t, state, 555) == (UNKNOWN_CARD, -1, WARN_NONE)


def test_validity_window_from_inclusive_until_exclusive(fp):
    p = Person("p-new", [100], valid_from=NOW, valid_until=NOW + 3600)
    t = build(fp, [p])
    state = fp.GateState()
    for direction in (IN, OUT):
        assert decide(fp, t, state, 100, direction, epoch_s=NOW - 1)[0] == NOT_YET_VALID
        assert decide(fp, t, state, 100, direction, epoch_s=NOW)[0] == GRANTED
        assert decide(fp, t, state, 100, direction, epoch_s=NOW + 3599)[0] == GRANTED
        assert decide(fp, t, state, 100, direction, epoch_s=NOW + 3600)[0] == EXPIRED


def test_the_ends_of_time_for_a_person_without_a_window(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    assert decide(fp, t, state, 100, epoch_s=NO_START)[0] == GRANTED
    assert decide(fp, t, state, 100, epoch_s=NO_END - 1)[0] == GRANTED
    assert decide(fp, t, state, 100, epoch_s=NO_END)[0] == EXPIRED  # until is exclusive


@pytest.mark.parametrize("spread", ["random 64-bit UIDs", "one facility's card numbers"])
def test_a_large_table_finds_every_card_and_no_other(fp, spread):
    import random

    rng = random.Random(7)
    if spread == "random 64-bit UIDs":
        keys = list(dict.fromkeys(rng.getrandbits(64) for _ in range(20_100)))[:20_000]
    else:  # facility 100, card numbers in a row: the clustering of a real batch of cards
        keys = [(100 << 16) | n for n in range(20_000)]
        rng.shuffle(keys)
    persons = [Person(f"p{i}", [k]) for i, k in enumerate(keys[:10_000])]
    t = build(fp, persons, blocked=keys[10_000:12_000], key_width=64)
    assert len(t) == 12_000
    for i, k in enumerate(keys[:10_000]):
        assert t.lookup(k) == i and not t.is_blocked(k)
    for k in keys[10_000:12_000]:
        assert t.lookup(k) == -1 and t.is_blocked(k)
    for k in keys[12_000:]:
        assert t.lookup(k) == -1 and not t.is_blocked(k)


def test_every_refusal_keeps_its_reason_while_busy_and_a_grant_becomes_gate_busy(fp):
    groups = {
        "all": Group(),
        "pupils": Group(entry=bitmap(*weekdays(7, 9)), exit=bitmap(*weekdays(13, 18))),
    }
    persons = [
        ALICE,
        Person("p-future", [300], valid_from=NOW + 1),
        Person("p-past", [400], valid_until=NOW),
        Person("p-pupil", [500], groups=["pupils"]),
        Person("p-inside", [600]),
    ]
    t = build(fp, persons, groups=groups, blocked=[999])
    state = fp.GateState()
    state.record_passage("p-inside", IN, NOW - 60, DAY, False)
    cases = [
        ({"key": 100, "mode": LOCKDOWN}, LOCKDOWN_DENIED),
        ({"key": 100, "direction": OUT, "mode": ENTRY_ONLY}, WRONG_DIRECTION),
        ({"key": 999}, BLOCKED),
        ({"key": 555}, UNKNOWN_CARD),
        ({"key": 300}, NOT_YET_VALID),
        ({"key": 400}, EXPIRED),
        ({"key": 100, "day": HOLIDAY_DAY}, HOLIDAY),
        ({"key": 500, "at": minute(MON, 10)}, OUTSIDE_SCHEDULE),
        ({"key": 500, "direction": OUT, "at": minute(MON, 10)}, EXIT_RESTRICTED),
        ({"key": 600, "apb": APB_HARD}, ANTIPASSBACK),
        ({"key": 100}, GATE_BUSY),
    ]
    for kwargs, expected in cases:
        assert decide(fp, t, state, busy=True, **kwargs)[0] == expected, kwargs
        idle = decide(fp, t, state, busy=False, **kwargs)[0]
        assert idle == (GRANTED if expected == GATE_BUSY else expected), kwargs


def test_earlier_checks_win_over_later_ones(fp):
    groups = {"none": Group(entry=NEVER, exit=NEVER)}
    # Outside every schedule, on a holiday, out of date, and blocked: blocked wins...
    p = Person("p-all-wrong", [100, 101], groups=["none"], valid_until=NOW)
    t = build(fp, [p], groups=groups, blocked=[101])
    state = fp.GateState()
    assert decide(fp, t, state, 101, day=HOLIDAY_DAY)[0] == BLOCKED
    # ...then expiry beats the holiday and the schedule...
    assert decide(fp, t, state, 100, day=HOLIDAY_DAY)[0] == EXPIRED
    # ...the holiday beats the schedule, and the schedule beats anti-passback.
    valid = build(fp, [Person("p", [100], groups=["none"])], groups=groups)
    state.record_passage("p", IN, NOW - 10, DAY, False)
    assert decide(fp, valid, state, 100, day=HOLIDAY_DAY, apb=APB_HARD)[0] == HOLIDAY
    assert decide(fp, valid, state, 100, apb=APB_HARD)[0] == OUTSIDE_SCHEDULE


# --------------------------------------------------------------------------- schedules


def test_entry_schedule_edges_are_minute_exact(fp):
    groups = {"pupils": Group(entry=bitmap((minute(MON, 8), minute(MON, 9))), exit=ALWAYS)}
    t = build(fp, [Person("p", [100], groups=["pupils"])], groups=groups)
    state = fp.GateState()
    assert decide(fp, t, state, 100, at=minute(MON, 7, 59))[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 100, at=minute(MON, 8, 0))[0] == GRANTED
    assert decide(fp, t, state, 100, at=minute(MON, 8, 59))[0] == GRANTED
    assert decide(fp, t, state, 100, at=minute(MON, 9, 0))[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 100, at=minute(TUE, 8, 30))[0] == OUTSIDE_SCHEDULE
    # The exit schedule is separate: always open here.
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 7, 59))[0] == GRANTED


def test_exit_schedule_keeps_pupils_in_during_lessons(fp):
    lessons_out = bitmap((minute(MON, 0), minute(MON, 8)), (minute(MON, 13), minute(TUE, 0)))
    groups = {"young": Group(entry=ALWAYS, exit=lessons_out)}
    t = build(fp, [Person("p", [100], groups=["young"])], groups=groups)
    state = fp.GateState()
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 7, 59))[0] == GRANTED
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 8))[0] == EXIT_RESTRICTED
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 12, 59))[0] == EXIT_RESTRICTED
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 13))[0] == GRANTED
    # Entry during lessons is the entry schedule's business: allowed.
    assert decide(fp, t, state, 100, IN, at=minute(MON, 10))[0] == GRANTED


def test_first_and_last_minute_of_the_week(fp):
    last = MINUTES_PER_WEEK - 1
    groups = {"edges": Group(entry=bitmap((0, 1), (last, last + 1)), exit=bitmap((0, 1)))}
    t = build(fp, [Person("p", [100], groups=["edges"])], groups=groups)
    state = fp.GateState()
    assert decide(fp, t, state, 100, at=0)[0] == GRANTED
    assert decide(fp, t, state, 100, at=1)[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 100, at=last)[0] == GRANTED
    assert decide(fp, t, state, 100, at=last - 1)[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 100, OUT, at=0)[0] == GRANTED
    assert decide(fp, t, state, 100, OUT, at=last)[0] == EXIT_RESTRICTED


def test_minute_of_week_out_of_range_is_refused(fp):
    t = build(fp, [ALICE])
    for bad in (-1, MINUTES_PER_WEEK):
        with pytest.raises(ValueError, match="minute_of_week"):
            decide(fp, t, fp.GateState(), 100, at=bad)


@pytest.mark.parametrize(
    "changes, words",
    [({"direction": 2}, "direction"), ({"mode": 5}, "mode"), ({"apb": 4}, "apb_mode")],
)
def test_codes_out_of_range_are_refused(fp, changes, words):
    t = build(fp, [ALICE])
    with pytest.raises(ValueError, match=words):
        decide(fp, t, fp.GateState(), 100, **changes)


def test_any_group_of_a_person_allows(fp):
    groups = {
        "morning": Group(entry=bitmap((minute(MON, 7), minute(MON, 9))), exit=NEVER),
        "evening": Group(
            entry=bitmap((minute(MON, 17), minute(MON, 19))),
            exit=bitmap((minute(MON, 18), minute(MON, 20))),
        ),
    }
    both = Person("p-both", [100], groups=["morning", "evening"])
    morning = Person("p-morning", [200], groups=["morning"])
    t = build(fp, [both, morning], groups=groups)
    state = fp.GateState()
    assert decide(fp, t, state, 100, at=minute(MON, 8))[0] == GRANTED
    assert decide(fp, t, state, 100, at=minute(MON, 18))[0] == GRANTED
    assert decide(fp, t, state, 100, at=minute(MON, 12))[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 100, OUT, at=minute(MON, 19))[0] == GRANTED
    assert decide(fp, t, state, 200, at=minute(MON, 18))[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 200, OUT, at=minute(MON, 19))[0] == EXIT_RESTRICTED


def test_person_in_no_group_passes_no_schedule(fp):
    cols = _good_columns(person_groupset=array("i", [-1]))
    t = fp.Table(cols)
    state = fp.GateState()
    assert decide(fp, t, state, 5)[0] == OUTSIDE_SCHEDULE
    assert decide(fp, t, state, 5, OUT)[0] == EXIT_RESTRICTED
    assert decide(fp, t, state, 5, day=1)[0] == HOLIDAY


# --------------------------------------------------------------------------- holidays


def test_holiday_refuses_entries_unless_a_group_opens_on_holidays(fp):
    groups = {
        "pupils": Group(entry=ALWAYS, exit=ALWAYS),
        "staff": Group(entry=ALWAYS, entry_holiday=bitmap(*weekdays(8, 16)), exit=ALWAYS),
    }
    pupil = Person("p-pupil", [100], groups=["pupils"])
    staff = Person("p-staff", [200], groups=["staff"])
    both = Person("p-both", [300], groups=["pupils", "staff"])
    t = build(fp, [pupil, staff, both], groups=groups, holidays=[HOLIDAY_DAY, HOLIDAY_DAY + 7])
    state = fp.GateState()
    at, early = minute(TUE, 10), minute(TUE, 6)
    for day in (HOLIDAY_DAY, HOLIDAY_DAY + 7):
        assert decide(fp, t, state, 100, at=at, day=day)[0] == HOLIDAY
        assert decide(fp, t, state, 200, at=at, day=day)[0] == GRANTED
        assert decide(fp, t, state, 300, at=at, day=day)[0] == GRANTED
        # Staff on a holiday follow the holiday schedule, not the ordinary one.
        assert decide(fp, t, state, 200, at=early, day=day)[0] == OUTSIDE_SCHEDULE
    # An ordinary day: everyone by the ordinary schedule.
    for key in (100, 200, 300):
        assert decide(fp, t, state, key, at=early, day=DAY)[0] == GRANTED


def test_holiday_exits_follow_the_exit_schedule(fp):
    groups = {"pupils": Group(entry=ALWAYS, exit=bitmap((minute(SAT, 12), minute(SAT, 14))))}
    t = build(fp, [Person("p", [100], groups=["pupils"])], groups=groups)
    state = fp.GateState()
    assert decide(fp, t, state, 100, OUT, at=minute(SAT, 13), day=HOLIDAY_DAY)[0] == GRANTED
    assert decide(fp, t, state, 100, OUT, at=minute(SAT, 11), day=HOLIDAY_DAY)[0] == EXIT_RESTRICTED


def test_no_holidays_means_every_day_is_ordinary(fp):
    t = build(fp, [ALICE], holidays=[])
    assert decide(fp, t, fp.GateState(), 100, day=HOLIDAY_DAY)[0] == GRANTED


# --------------------------------------------------------------------------- guests


def test_guest_use_is_spent_only_by_an_entry_passage(fp):
    guest = Person(
        "g-1", [300], guest=True, max_uses=2, valid_from=NOW - 60, valid_until=NOW + 3600
    )
    t = build(fp, [guest])
    state = fp.GateState()
    # Grants alone spend nothing.
    for _ in range(5):
        assert decide(fp, t, state, 300)[0] == GRANTED
    assert state.uses("g-1") == 0
    state.record_passage("g-1", IN, NOW, DAY, True)
    state.record_passage("g-1", OUT, NOW + 10, DAY, True)  # an exit spends no use
    assert state.uses("g-1") == 1
    assert decide(fp, t, state, 300)[0] == GRANTED
    state.record_passage("g-1", IN, NOW + 20, DAY, True)
    assert state.uses("g-1") == 2
    assert decide(fp, t, state, 300, IN)[0] == EXPIRED


def test_guest_can_always_leave(fp):
    groups = {"visitors": Group(entry=ALWAYS, exit=NEVER)}
    guest = Person(
        "g-1",
        [300],
        groups=["visitors"],
        guest=True,
        max_uses=1,
        valid_from=NOW - 60,
        valid_until=NOW + 3600,
    )
    t = build(fp, [guest], groups=groups)
    state = fp.GateState()
    state.record_passage("g-1", IN, NOW, DAY, True)
    state.record_passage("g-1", OUT, NOW + 5, DAY, True)
    # Out of uses, past the window, outside any exit schedule, already out (hard APB):
    for epoch in (NOW, NOW + 7200, NOW - 3600):
        assert decide(fp, t, state, 300, OUT, epoch_s=epoch, apb=APB_HARD) == (
            GRANTED,
            0,
            WARN_NONE,
        )
    assert decide(fp, t, state, 300, IN)[0] == EXPIRED
    assert decide(fp, t, state, 300, IN, epoch_s=NOW - 3600)[0] == NOT_YET_VALID
    # Leaving still waits for a busy lane.
    assert decide(fp, t, state, 300, OUT, busy=True)[0] == GATE_BUSY


def test_guest_without_a_use_limit_is_not_counted_out(fp):
    guest = Person("g-2", [300], guest=True, max_uses=0)
    t = build(fp, [guest])
    state = fp.GateState()
    for i in range(3):
        state.record_passage("g-2", IN, NOW + i, DAY, True)
    assert decide(fp, t, state, 300)[0] == GRANTED


# --------------------------------------------------------------------------- anti-passback


def test_apb_off_ignores_positions(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    state.record_passage("p-alice", IN, NOW - 1, DAY, False)
    assert decide(fp, t, state, 100, IN, apb=APB_OFF) == (GRANTED, 0, WARN_NONE)


def test_apb_soft_grants_with_a_warning(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    assert decide(fp, t, state, 100, IN, apb=APB_SOFT) == (GRANTED, 0, WARN_NONE)
    state.record_passage("p-alice", IN, NOW, DAY, False)
    assert decide(fp, t, state, 100, IN, apb=APB_SOFT) == (GRANTED, 0, WARN_ANTIPASSBACK)
    assert decide(fp, t, state, 100, OUT, apb=APB_SOFT) == (GRANTED, 0, WARN_NONE)
    state.record_passage("p-alice", OUT, NOW + 5, DAY, False)
    assert decide(fp, t, state, 100, OUT, apb=APB_SOFT) == (GRANTED, 0, WARN_ANTIPASSBACK)
    # A busy lane drops the grant, and its warning with it.
    assert decide(fp, t, state, 100, OUT, apb=APB_SOFT, busy=True) == (GATE_BUSY, 0, WARN_NONE)


def test_apb_hard_refuses_a_second_entry_or_exit(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    state.record_passage("p-alice", IN, NOW, DAY, False)
    assert decide(fp, t, state, 100, IN, apb=APB_HARD) == (ANTIPASSBACK, 0, WARN_NONE)
    assert decide(fp, t, state, 101, IN, apb=APB_HARD)[0] == ANTIPASSBACK  # her other card too
    assert decide(fp, t, state, 100, OUT, apb=APB_HARD) == (GRANTED, 0, WARN_NONE)
    state.record_passage("p-alice", OUT, NOW + 5, DAY, False)
    assert decide(fp, t, state, 100, OUT, apb=APB_HARD)[0] == ANTIPASSBACK
    assert decide(fp, t, state, 100, IN, apb=APB_HARD)[0] == GRANTED


def test_apb_timed_refuses_entries_within_the_window_only(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    window = 600
    assert decide(fp, t, state, 100, apb=APB_TIMED, window=window)[0] == GRANTED
    state.record_passage("p-alice", IN, NOW, DAY, False)
    assert (
        decide(fp, t, state, 100, epoch_s=NOW + 1, apb=APB_TIMED, window=window)[0] == ANTIPASSBACK
    )
    assert (
        decide(fp, t, state, 100, epoch_s=NOW + window - 1, apb=APB_TIMED, window=window)[0]
        == ANTIPASSBACK
    )
    assert (
        decide(fp, t, state, 100, epoch_s=NOW + window, apb=APB_TIMED, window=window)[0] == GRANTED
    )
    # Exits are free, and an exit does not end the window.
    assert (
        decide(fp, t, state, 100, OUT, epoch_s=NOW + 1, apb=APB_TIMED, window=window)[0] == GRANTED
    )
    state.record_passage("p-alice", OUT, NOW + 2, DAY, False)
    assert (
        decide(fp, t, state, 100, epoch_s=NOW + 3, apb=APB_TIMED, window=window)[0] == ANTIPASSBACK
    )


def test_a_timed_out_grant_moves_nobody(fp):
    t = build(fp, [ALICE, Person("g-1", [300], guest=True, max_uses=1)])
    state = fp.GateState()
    before = state.to_dict()
    for apb in (APB_SOFT, APB_HARD, APB_TIMED):
        for key in (100, 300):
            for direction in (IN, OUT):
                assert decide(fp, t, state, key, direction, apb=apb, window=600)[0] == GRANTED
    # No passage followed the grants: everybody is where they were, no use spent.
    assert state.to_dict() == before
    assert decide(fp, t, state, 100, apb=APB_HARD) == (GRANTED, 0, WARN_NONE)
    assert decide(fp, t, state, 300) == (GRANTED, 1, WARN_NONE)


def test_first_read_of_a_new_day_is_allowed(fp):
    t = build(fp, [ALICE])
    state = fp.GateState()
    state.record_passage("p-alice", IN, NOW, DAY, False)  # forgot to badge out yesterday
    assert state.position("p-alice", DAY) == POS_IN
    assert state.position("p-alice", DAY + 1) == POS_UNKNOWN
    assert decide(fp, t, state, 100, apb=APB_HARD, day=DAY + 1, epoch_s=NOW + 86400)[0] == GRANTED
    assert decide(fp, t, state, 100, apb=APB_SOFT, day=DAY + 1, epoch_s=NOW + 86400) == (
        GRANTED,
        0,
        WARN_NONE,
    )


def test_state_outlives_a_table_swap(fp):
    old = build(fp, [ALICE, BOB], version="v1")
    state = fp.GateState()
    state.record_passage("p-bob", IN, NOW, DAY, False)
    new = build(fp, [Person("p-carol", [700]), Person("p-dave", [800]), BOB], version="v2")
    assert old.lookup(200) != new.lookup(200)
    assert decide(fp, new, state, 200, apb=APB_HARD) == (ANTIPASSBACK, new.lookup(200), WARN_NONE)
    assert decide(fp, new, state, 700, apb=APB_HARD)[0] == GRANTED


# --------------------------------------------------------------------------- gate state


def test_record_passage_sets_position_last_entry_and_uses(fp):
    state = fp.GateState()
    assert state.position("p", DAY) == POS_UNKNOWN and state.last_entry("p") == 0
    assert state.uses("p") == 0
    state.record_passage("p", IN, NOW, DAY, False)
    assert (state.position("p", DAY), state.last_entry("p"), state.uses("p")) == (POS_IN, NOW, 0)
    state.record_passage("p", OUT, NOW + 9, DAY, False)
    assert (state.position("p", DAY), state.last_entry("p")) == (POS_OUT, NOW)
    state.record_passage("g", IN, NOW, DAY, True)
    assert state.uses("g") == 1
    with pytest.raises(ValueError, match="direction"):
        state.record_passage("p", 7, NOW, DAY, False)


def test_gate_state_round_trips_through_json(fp):
    state = fp.GateState()
    state.record_passage("p-alice", IN, NOW, DAY, False)
    state.record_passage("p-bob", IN, NOW, DAY - 3, False)
    state.record_passage("p-bob", OUT, NOW + 60, DAY - 3, False)
    state.record_passage("g-1", IN, NOW - 86400 * 30, DAY - 30, True)  # uses kept whatever the day
    state.record_passage("g-1", IN, NOW, DAY, True)
    d = state.to_dict()
    back = fp.GateState.from_dict(json.loads(json.dumps(d)))
    assert back.to_dict() == d
    for pid in ("p-alice", "p-bob", "g-1", "nobody"):
        for day in (DAY, DAY - 3):
            assert back.position(pid, day) == state.position(pid, day)
        assert back.last_entry(pid) == state.last_entry(pid)
        assert back.uses(pid) == state.uses(pid)
    assert back.uses("g-1") == 2


def test_gate_state_format_is_the_same_for_both_twins(fp):
    import fastpath._pure as pure

    state = fp.GateState()
    state.record_passage("g-1", IN, NOW, DAY, True)
    other = pure.GateState.from_dict(state.to_dict())
    assert other.to_dict() == state.to_dict()


@pytest.mark.parametrize(
    "bad",
    [
        [],
        {"format": 99},
        {"format": 1, "positions": {"p": [3, DAY]}},
        {"format": 1, "positions": {"p": [1]}},
        {"format": 1, "positions": []},
        {"format": 1, "last_entry": {"p": "yesterday"}},
        {"format": 1, "uses": {"g": -1}},
        {"format": 1, "uses": {"g": 2**70}},
    ],
)
def test_damaged_gate_state_is_refused_with_a_way_out(fp, bad):
    with pytest.raises(ValueError, match="delete the gate state file"):
        fp.GateState.from_dict(bad)


def test_decide_never_changes_the_state(fp):
    t = build(fp, [ALICE, Person("g-1", [300], guest=True, max_uses=2)], blocked=[999])
    state = fp.GateState()
    state.record_passage("p-alice", IN, NOW, DAY, False)
    before = state.to_dict()
    for key in (100, 300, 999, 555):
        for direction in (IN, OUT):
            for apb in (APB_OFF, APB_SOFT, APB_HARD, APB_TIMED):
                decide(fp, t, state, key, direction, apb=apb, window=60)
    assert state.to_dict() == before


def _plain_columns(n: int, first_key: int) -> TableColumns:
    """n people with one card each (keys first_key..first_key+n-1), one open group."""
    return TableColumns(
        version=f"v{first_key}", key_width=32,
        card_keys=array("Q", range(first_key, first_key + n)), card_person=array("i", range(n)),
        card_flags=array("B", bytes(n)), person_ids=[f"p-{i:08x}" for i in range(n)],
        person_from=array("q", [codes.NO_START]) * n, person_until=array("q", [codes.NO_END]) * n,
        person_groupset=array("i", bytes(4 * n)), person_flags=array("B", bytes(n)),
        person_max_uses=array("i", bytes(4 * n)),
        gs_entry=[b"\xff" * codes.BITMAP_BYTES], gs_entry_holiday=[bytes(codes.BITMAP_BYTES)],
        gs_exit=[b"\xff" * codes.BITMAP_BYTES], holidays=array("i"))


def test_a_freed_big_table_lends_its_memory_to_the_next_one_wiped(fp_pair):
    """The compiled twin keeps the last big table's arena (MADV_FREE) for the next table
    of the same size: the next table takes it, and nothing of the old one shows through
    (the old list's cards are unknown to the new one; the new one's are found)."""
    import gc

    _, compiled = fp_pair
    n = 300_000
    gc.collect()  # no other test's table is freed in the middle of this one
    old = compiled.Table(_plain_columns(n, 1_000_000))
    size = old.nbytes()
    del old
    gc.collect()
    spare = compiled._spare_arena_bytes()
    assert spare >= 8 << 20 and abs(spare - size) < 2 << 20, (spare, size)  # kept for the next table
    new = compiled.Table(_plain_columns(n, 5_000_000))
    assert compiled._spare_arena_bytes() == 0  # taken
    for k in range(1_000_000, 1_000_000 + n, 997):
        assert new.lookup(k) == -1  # the old list's card: unknown
    for j in range(0, n, 997):
        assert new.lookup(5_000_000 + j) == j
