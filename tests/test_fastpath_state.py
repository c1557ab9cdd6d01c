"""GateState at scale: many persons, hash collisions, growth, persistence, table swaps.

The compiled twin keeps the state in a C hash table keyed by the person id's
UTF-8 bytes (fastpath/_compiled.pyx, GateState); these tests hold it to the
pure twin's dicts. ``_narrow_hash(mask)`` (compiled only, for tests) keeps only
the hash bits in `mask`, so ids collide in the slot and in the whole hash.
"""

from __future__ import annotations

import json
import random
from array import array

import pytest

from fastpath import codes
from fastpath.codes import (
    ANTIPASSBACK,
    APB_HARD,
    APB_OFF,
    APB_SOFT,
    APB_TIMED,
    BITMAP_BYTES,
    EXPIRED,
    GRANTED,
    IN,
    NO_END,
    NO_START,
    NORMAL,
    OUT,
    POS_IN,
    POS_OUT,
    POS_UNKNOWN,
    WARN_ANTIPASSBACK,
    WARN_NONE,
)
from fastpath.columns import TableColumns

NOW = 1_757_000_000
DAY = 739_500
MONDAY_10AM = 600
OPEN = b"\xff" * BITMAP_BYTES
APB_MODES = (APB_OFF, APB_SOFT, APB_HARD, APB_TIMED)
# All the hash bits, a few (slot and tag collide for many ids), none (every id collides).
MASKS = (2**64 - 1, 0x7_0000_0007, 0)

# Ids that stress a byte-keyed table: empty, prefixes of each other, one byte
# apart, exactly 8 and 24 bytes (word and inline limits) and one more,
# non-ASCII, long, and ids equal in their first 24 bytes.
ODD_IDS = [
    "",
    "p",
    "p-1",
    "p-10",
    "p-100",
    "p-1\x00",
    "12345678",
    "123456789",
    "a" * 24,
    "a" * 25,
    "a" * 24 + "b",
    "Пётр-Иванов-учитель-физики-0001",
    "x" * 128,
    "x" * 127 + "y",
]


def columns(person_ids: list[str], guests: dict[str, int] | None = None) -> TableColumns:
    """Open schedules; person i has card 1000 + i (by position in person_ids)."""
    guests = guests or {}
    n = len(person_ids)
    return TableColumns(
        version="v",
        key_width=24,
        card_keys=array("Q", [1000 + i for i in range(n)]),
        card_person=array("i", range(n)),
        card_flags=array("B", bytes(n)),
        person_ids=list(person_ids),
        person_from=array("q", [NOW - 86400 if p in guests else NO_START for p in person_ids]),
        person_until=array("q", [NOW + 86400 if p in guests else NO_END for p in person_ids]),
        person_groupset=array("i", [0] * n),
        person_flags=array("B", [codes.PERSON_GUEST if p in guests else 0 for p in person_ids]),
        person_max_uses=array("i", [guests.get(p, 0) for p in person_ids]),
        gs_entry=[OPEN],
        gs_entry_holiday=[OPEN],
        gs_exit=[OPEN],
        holidays=array("i"),
    )


def random_history(person_ids: list[str], n: int, seed: int) -> list[tuple]:
    """record_passage arguments: people (and strangers) in and out over three days."""
    rng = random.Random(seed)
    pool = person_ids + ["stranger-1", "stranger-2"]
    return [
        (
            rng.choice(pool),
            rng.choice((IN, OUT)),
            NOW - rng.randrange(3 * 86400),
            DAY - rng.randrange(3),
            rng.random() < 0.3,
        )
        for _ in range(n)
    ]


def state_of(fp, history: list[tuple], mask: int | None = None, narrow_first: bool = True):
    state = fp.GateState()
    if mask is not None and narrow_first:
        state._narrow_hash(mask)
    for args in history:
        state.record_passage(*args)
    if mask is not None and not narrow_first:
        state._narrow_hash(mask)  # rehashes the entries already there
    return state


def assert_same_state(pure_state, comp_state, ids: list[str]) -> None:
    assert comp_state.to_dict() == pure_state.to_dict()
    assert repr(comp_state) == repr(pure_state)
    for pid in ids:
        for day in (DAY - 2, DAY - 1, DAY):
            assert comp_state.position(pid, day) == pure_state.position(pid, day), pid
        assert comp_state.last_entry(pid) == pure_state.last_entry(pid), pid
        assert comp_state.uses(pid) == pure_state.uses(pid), pid


def all_decisions(fp, table, state, n_persons: int) -> list[tuple]:
    out = []
    for i in range(n_persons):
        for direction in (IN, OUT):
            for apb in APB_MODES:
                for epoch in (NOW, NOW + 300, NOW + 3 * 86400):
                    out.append(
                        fp.decide(
                            table,
                            state,
                            1000 + i,
                            direction,
                            NORMAL,
                            epoch,
                            MONDAY_10AM,
                            DAY,
                            False,
                            apb,
                            600,
                        )
                    )
    return out


# --------------------------------------------------------------------------- twins agree


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("narrow_first", [True, False])
def test_twins_agree_on_many_persons_with_colliding_hashes(fp_pair, mask, narrow_first):
    pure, compiled = fp_pair
    n = 600 if mask else 150  # every look-up scans all entries when every id collides
    ids = [f"p-{i:05d}" for i in range(n)] + ODD_IDS
    guests = {ids[i]: 1 + i % 3 for i in range(0, len(ids), 7)}
    history = random_history(ids, 4 * len(ids), seed=mask % 1000 + narrow_first)
    sp = state_of(pure, history)
    sc = state_of(compiled, history, mask, narrow_first)
    assert_same_state(sp, sc, ids + ["stranger-1", "nobody"])
    cols = columns(ids, guests)
    tp, tc = pure.Table(cols), compiled.Table(cols)
    assert all_decisions(compiled, tc, sc, len(ids)) == all_decisions(pure, tp, sp, len(ids))


def test_colliding_ids_stay_different_people(fp_pair):
    # With no hash bits every id has the same hash: only the bytes tell them apart.
    pure, compiled = fp_pair
    for fp in (pure, compiled):
        state = fp.GateState()
        if fp is compiled:
            state._narrow_hash(0)
        state.record_passage("a" * 24, IN, NOW, DAY, False)
        state.record_passage("a" * 25, OUT, NOW + 1, DAY, False)
        state.record_passage("p-1", IN, NOW + 2, DAY, True)
        state.record_passage("p-2", OUT, NOW + 3, DAY, False)  # as long as p-1
        assert state.position("a" * 24, DAY) == POS_IN
        assert state.position("a" * 25, DAY) == POS_OUT
        assert state.position("a" * 23, DAY) == POS_UNKNOWN
        assert state.position("a" * 23 + "b", DAY) == POS_UNKNOWN
        assert state.position("p-1", DAY) == POS_IN and state.position("p-2", DAY) == POS_OUT
        assert state.position("p-3", DAY) == POS_UNKNOWN and state.uses("p-2") == 0
        assert state.last_entry("a" * 24) == NOW and state.last_entry("a" * 25) == 0
        assert state.uses("p-1") == 1 and state.uses("p-10") == 0 and state.uses("p-") == 0
        t = fp.Table(columns(["a" * 24, "a" * 25, "p-1", "p-10"], {"p-1": 1}))
        assert fp.decide(
            t, state, 1000, IN, NORMAL, NOW + 5, MONDAY_10AM, DAY, False, APB_HARD, 0
        ) == (ANTIPASSBACK, t.lookup(1000), WARN_NONE)
        assert fp.decide(
            t, state, 1001, IN, NORMAL, NOW + 5, MONDAY_10AM, DAY, False, APB_HARD, 0
        ) == (GRANTED, t.lookup(1001), WARN_NONE)
        # The guest's one use is spent; p-10 (the same bytes and one more) is a stranger.
        assert (
            fp.decide(t, state, 1002, IN, NORMAL, NOW + 5, MONDAY_10AM, DAY, False, APB_OFF, 0)[0]
            == EXPIRED
        )
        assert (
            fp.decide(t, state, 1003, IN, NORMAL, NOW + 5, MONDAY_10AM, DAY, False, APB_TIMED, 600)[
                0
            ]
            == GRANTED
        )


def test_state_grows_far_past_its_first_size(fp):
    n = 20_000
    state = fp.GateState()
    for i in range(n):
        state.record_passage(f"person-{i}", IN if i % 2 else OUT, NOW + i, DAY, i % 5 == 0)
    assert repr(state) == f"<GateState positions={n} guests={n // 10}>"  # entries spend uses
    for i in range(0, n, 7):
        pid = f"person-{i}"
        assert state.position(pid, DAY) == (POS_IN if i % 2 else POS_OUT)
        assert state.last_entry(pid) == (NOW + i if i % 2 else 0)
        assert state.uses(pid) == (1 if i % 5 == 0 and i % 2 else 0)
    assert state.position(f"person-{n}", DAY) == POS_UNKNOWN
    back = fp.GateState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert back.to_dict() == state.to_dict()


# --------------------------------------------------------------------------- persistence

# A state file's "state" as today's agent wrote it (pure GateState.to_dict, both twins
# write the same), before the compiled twin kept the state in C.
STATE_BEFORE = json.loads(
    r"""
{"format": 1,
 "positions": {"p-0001": [1, 739500], "p-0002": [2, 739499], "g-0042": [1, 739500],
  "\u041f\u0451\u0442\u0440-\u0418\u0432\u0430\u043d\u043e\u0432-\u0443\u0447\u0438\u0442\u0435\u043b\u044c-\u0444\u0438\u0437\u0438\u043a\u0438-0001": [1, 739500],
  "p-only-out": [2, 739500]},
 "last_entry": {"p-0001": 1757000000, "p-0002": 1756992800, "g-0042": 1756999940,
  "\u041f\u0451\u0442\u0440-\u0418\u0432\u0430\u043d\u043e\u0432-\u0443\u0447\u0438\u0442\u0435\u043b\u044c-\u0444\u0438\u0437\u0438\u043a\u0438-0001": 1756999970},
 "uses": {"g-0042": 2}}
"""
)
TEACHER = "Пётр-Иванов-учитель-физики-0001"


def test_a_state_written_before_loads_and_is_written_back_the_same(fp):
    state = fp.GateState.from_dict(STATE_BEFORE)
    assert state.to_dict() == STATE_BEFORE
    assert json.loads(json.dumps(state.to_dict())) == STATE_BEFORE
    assert state.position("p-0001", DAY) == POS_IN
    assert state.position("p-0002", DAY - 1) == POS_OUT and state.position("p-0002", DAY) == 0
    assert state.position(TEACHER, DAY) == POS_IN and state.last_entry(TEACHER) == NOW - 30
    assert state.last_entry("p-only-out") == 0
    assert state.uses("g-0042") == 2
    table = fp.Table(columns(["p-0001", TEACHER, "g-0042"], {"g-0042": 2}))
    assert fp.decide(table, state, 1001, IN, NORMAL, NOW, MONDAY_10AM, DAY, False, APB_SOFT, 0) == (
        GRANTED,
        table.lookup(1001),
        WARN_ANTIPASSBACK,
    )
    assert (
        fp.decide(table, state, 1002, IN, NORMAL, NOW, MONDAY_10AM, DAY, False, APB_OFF, 0)[0]
        == EXPIRED
    )


def test_sections_load_independently(fp):
    # A person may appear in any one section (older files, hand-made repairs).
    d = {"format": 1, "last_entry": {"a": 5}, "uses": {"b": 3}, "positions": {"c": [2, 0]}}
    state = fp.GateState.from_dict(d)
    assert state.to_dict() == {**d}
    assert state.position("a", 0) == POS_UNKNOWN and state.last_entry("a") == 5
    assert state.uses("b") == 3 and state.position("b", 0) == POS_UNKNOWN
    assert state.position("c", 0) == POS_OUT and state.last_entry("c") == 0


def test_an_id_with_lone_surrogates_survives_the_round_trip(fp_pair):
    # JSON can carry "\ud800"; no table id can (not UTF-8), but the file must round-trip.
    d = {"format": 1, "positions": {"\ud800x": [1, DAY]}, "last_entry": {}, "uses": {}}
    for fp in fp_pair:
        state = fp.GateState.from_dict(d)
        assert state.to_dict() == d
        assert state.position("\ud800x", DAY) == POS_IN
        assert state.position("\ud800", DAY) == POS_UNKNOWN
        state.record_passage("\udfff", OUT, NOW, DAY, False)
        assert state.position("\udfff", DAY) == POS_OUT


def test_a_guest_use_count_stays_inside_int64(fp):
    state = fp.GateState.from_dict({"format": 1, "uses": {"g": NO_END}})
    state.record_passage("g", IN, NOW, DAY, True)
    assert state.uses("g") == NO_END
    assert fp.GateState.from_dict(json.loads(json.dumps(state.to_dict()))).uses("g") == NO_END


def test_a_person_id_must_be_a_str(fp):
    state = fp.GateState()
    for bad in (7, b"p-1", None, ("p",)):
        with pytest.raises(TypeError, match="person_id"):
            state.record_passage(bad, IN, NOW, DAY, False)
    assert state.to_dict() == {"format": 1, "positions": {}, "last_entry": {}, "uses": {}}
    assert state.position(7, DAY) == POS_UNKNOWN and state.uses(7) == 0
    assert state.last_entry(None) == 0


# --------------------------------------------------------------------------- table swaps


def test_state_follows_people_across_table_swaps(fp_pair):
    """New Table objects: the same persons, persons removed, persons added (indexes move)."""
    pure, compiled = fp_pair
    first = [f"p-{i:04d}" for i in range(300)]
    history = random_history(first, 900, seed=7)
    rng = random.Random(8)
    kept = [p for p in first if rng.random() < 0.7]
    swaps = [
        first,  # a new Table object with the same persons
        kept,  # some removed: everybody after them moves down
        [f"n-{i:04d}" for i in range(50)] + kept + ["stranger-1"],  # added in front and a stranger
        first,  # and the removed ones come back
    ]
    sp, sc = state_of(pure, history), state_of(compiled, history)
    for ids in swaps:
        cols = columns(ids)
        tp, tc = pure.Table(cols), compiled.Table(cols)
        assert all_decisions(compiled, tc, sc, len(ids)) == all_decisions(pure, tp, sp, len(ids))
        # A passage on the new table moves the person for the next table too.
        for pid in ids[::17]:
            sp.record_passage(pid, OUT, NOW + 60, DAY, False)
            sc.record_passage(pid, OUT, NOW + 60, DAY, False)
        assert_same_state(sp, sc, ids)


def test_hard_anti_passback_holds_across_a_swap_that_moves_the_person(fp):
    state = fp.GateState()
    old = fp.Table(columns(["p-b", "p-c"]))
    state.record_passage(old.person_id(old.lookup(1000)), IN, NOW, DAY, False)  # p-b is in
    new = fp.Table(columns(["p-a", "p-b", "p-c"]))  # p-b has card 1001 and index 1 now
    args = (NORMAL, NOW + 5, MONDAY_10AM, DAY, False, APB_HARD, 0)
    assert fp.decide(new, state, 1001, IN, *args) == (ANTIPASSBACK, new.lookup(1001), WARN_NONE)
    assert fp.decide(new, state, 1000, IN, *args)[0] == GRANTED  # p-a, at p-b's old index
    assert fp.decide(new, state, 1001, OUT, *args)[0] == GRANTED


# --------------------------------------------------------------------------- calling decide


def test_decide_takes_keywords_and_refuses_wrong_calls_alike(fp):
    """The compiled decide is a METH_FASTCALL builtin; keywords and errors still work."""
    t = fp.Table(columns(["p-1"]))
    state = fp.GateState()
    state.record_passage("p-1", IN, NOW, DAY, False)
    args = (t, state, 1000, IN, NORMAL, NOW + 1, MONDAY_10AM, DAY, False, APB_SOFT, 0)
    names = (
        "table",
        "state",
        "key",
        "direction",
        "mode",
        "epoch_s",
        "minute_of_week",
        "day",
        "busy",
        "apb_mode",
        "apb_window_s",
    )
    want = (GRANTED, 0, WARN_ANTIPASSBACK)
    assert fp.decide(*args) == want
    assert fp.decide(**dict(zip(names, args))) == want
    assert fp.decide(*args[:5], **dict(zip(names[5:], args[5:]))) == want
    with pytest.raises(TypeError):
        fp.decide(*args[:10])
    with pytest.raises(TypeError):
        fp.decide(*args, 0)
    if fp.__name__.endswith("_compiled"):  # the pure twin does not check the types
        with pytest.raises(TypeError):
            fp.decide(None, *args[1:])
        with pytest.raises(TypeError):
            fp.decide(t, {}, *args[2:])
    with pytest.raises(TypeError):
        fp.decide(*args[:2], 1000.0, *args[3:])  # a float is no card key
    with pytest.raises(ValueError, match="direction"):
        fp.decide(*args[:3], 7, *args[4:])


def test_bad_arguments_are_refused_in_the_same_order(fp_pair):
    # A bad direction is named before a bad key, by both twins.
    pure, compiled = fp_pair
    for fp in (pure, compiled):
        t = fp.Table(columns(["p-1"]))
        args = (t, fp.GateState(), 1000.0, 7, NORMAL, NOW, MONDAY_10AM, DAY, False, APB_OFF, 0)
        with pytest.raises(ValueError, match="direction"):
            fp.decide(*args)
        with pytest.raises(TypeError):
            fp.decide(*args[:3], IN, *args[4:])
        assert fp.decide(*args[:2], True, IN, *args[4:])[0] == codes.UNKNOWN_CARD  # bool is an int
