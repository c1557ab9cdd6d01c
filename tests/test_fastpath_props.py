"""Hypothesis properties of the fastpath: the twins agree, and simple models hold.

Random small tables (keys, persons, flags, validity windows, groupsets with
random bitmaps, holidays), random states built by record_passage sequences,
and random reads, times, modes, busy flags and anti-passback settings.
"""

from __future__ import annotations

from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastpath import codes
from fastpath.codes import (
    APB_MODES,
    BITMAP_BYTES,
    ENTRY_ONLY,
    FIRE,
    FREE,
    GATE_BUSY,
    GRANTED,
    IN,
    LOCKDOWN,
    LOCKDOWN_DENIED,
    MINUTES_PER_WEEK,
    NO_END,
    NO_START,
    NORMAL,
    OUT,
    POS_IN,
    POS_OUT,
    POS_UNKNOWN,
    UNKNOWN_CARD,
)
from fastpath.columns import TableColumns

NOW = 1_700_000_000
DAY = 738_000

# `fp` is a module, the same for every example: nothing to reset between them.
PROPS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Keys cluster in a small range so reads hit cards, plus the 64-bit edges.
card_keys = st.one_of(st.integers(0, 40), st.sampled_from([2**24 - 1, 2**40 + 3, 2**64 - 1]))
read_keys = st.one_of(card_keys, st.sampled_from([-1, 2**64, 2**80]))
# Validity bounds come from a few values; epochs hit them exactly or land near them.
FROMS = [NO_START, NO_START, NOW - 100, NOW, NOW + 100]
UNTILS = [NO_END, NO_END, NOW - 50, NOW, NOW + 200]
epochs = st.one_of(
    st.sampled_from(
        sorted(
            {b + d for b in (NOW - 100, NOW - 50, NOW, NOW + 100, NOW + 200) for d in (-1, 0, 1)}
        )
    ),
    st.integers(NOW - 300, NOW + 300),
)
days = st.integers(DAY, DAY + 2)


def _spans_bitmap(spans: list[tuple[int, int]]) -> bytes:
    # As one int, bit i = minute i; little-endian bytes put it at byte i // 8, bit i % 8.
    bits = 0
    for start, length in spans:
        bits |= ((1 << length) - 1) << start
    return (bits & ((1 << MINUTES_PER_WEEK) - 1)).to_bytes(BITMAP_BYTES, "little")


bitmaps = st.one_of(
    st.just(b"\xff" * BITMAP_BYTES),
    st.just(bytes(BITMAP_BYTES)),
    st.binary(min_size=BITMAP_BYTES, max_size=BITMAP_BYTES),
    st.lists(st.tuples(st.integers(0, MINUTES_PER_WEEK - 1), st.integers(1, 3000)), max_size=4).map(
        _spans_bitmap
    ),
)


@st.composite
def columns(draw) -> TableColumns:
    """A valid TableColumns (sorted unique keys, indices in range)."""
    n_gs = draw(st.integers(0, 3))
    n_persons = draw(st.integers(0, 6))
    keys = sorted(draw(st.sets(card_keys, min_size=n_persons, max_size=12)))
    # Everybody has a card, a few cards belong to nobody and few are blocked, so
    # reads reach the later checks. (The empty table has its own tests.)
    extra = st.one_of(st.integers(0, n_persons - 1), st.just(-1)) if n_persons else st.just(-1)
    owners = draw(st.permutations(list(range(n_persons)) + [draw(extra) for _ in keys[n_persons:]]))
    return TableColumns(
        version=draw(st.text(max_size=5)),
        key_width=draw(st.sampled_from([24, 32, 64])),
        card_keys=array("Q", keys),
        card_person=array("i", owners),
        card_flags=array("B", [draw(st.sampled_from([0, 0, 0, codes.CARD_BLOCKED])) for _ in keys]),
        person_ids=[f"p{i}-{draw(st.text(max_size=3))}" for i in range(n_persons)],
        person_from=array("q", [draw(st.sampled_from(FROMS)) for _ in range(n_persons)]),
        person_until=array("q", [draw(st.sampled_from(UNTILS)) for _ in range(n_persons)]),
        person_groupset=array(
            "i",
            [
                draw(st.integers(0 if n_gs else -1, n_gs - 1) | st.just(-1))
                for _ in range(n_persons)
            ],
        ),
        person_flags=array(
            "B", [draw(st.sampled_from([0, codes.PERSON_GUEST])) for _ in range(n_persons)]
        ),
        person_max_uses=array("i", [draw(st.integers(0, 3)) for _ in range(n_persons)]),
        gs_entry=[draw(bitmaps) for _ in range(n_gs)],
        gs_entry_holiday=[draw(bitmaps) for _ in range(n_gs)],
        gs_exit=[draw(bitmaps) for _ in range(n_gs)],
        holidays=array("i", sorted(draw(st.sets(days, max_size=3)))),
    )


def passages(cols: TableColumns):
    """record_passage argument lists for people of the table and strangers."""
    pids = st.sampled_from(list(cols.person_ids) + ["stranger"])
    return st.lists(
        st.tuples(pids, st.sampled_from([IN, OUT]), epochs, days, st.booleans()),
        min_size=len(cols.person_ids) // 2,
        max_size=12,
    )


def reads(cols: TableColumns, history: list[tuple]):
    """decide() arguments after (table, state).

    Keys are mostly the table's own cards; days and times often those of the
    recorded passages, so anti-passback has positions and entries to act on.
    """
    known = st.sampled_from(list(cols.card_keys))
    keys = st.one_of(known, known, known, read_keys) if cols.card_keys else read_keys
    read_days, read_epochs = days, epochs
    if history:
        read_days = st.one_of(st.sampled_from([h[3] for h in history]), days)
        since = st.tuples(st.sampled_from([h[2] for h in history]), st.integers(0, 400))
        read_epochs = st.one_of(since.map(sum), epochs)
    return st.tuples(
        keys,
        st.sampled_from([IN, OUT]),
        st.sampled_from([NORMAL, NORMAL, NORMAL, FREE, ENTRY_ONLY, LOCKDOWN, FIRE]),
        read_epochs,
        st.integers(0, MINUTES_PER_WEEK - 1),
        read_days,
        st.booleans(),
        st.integers(0, len(APB_MODES) - 1),
        st.one_of(st.just(0), st.integers(0, 400)),
    )


def _state(fp, history):
    state = fp.GateState()
    for args in history:
        state.record_passage(*args)
    return state


@PROPS
@given(data=st.data())
def test_twins_decide_alike(fp_pair, data):
    pure, compiled = fp_pair
    cols = data.draw(columns())
    history = data.draw(passages(cols))
    tp, tc = pure.Table(cols), compiled.Table(cols)
    sp, sc = _state(pure, history), _state(compiled, history)
    assert sp.to_dict() == sc.to_dict()
    assert (len(tp), tp.persons, tp.version, tp.key_width) == (
        len(tc),
        tc.persons,
        tc.version,
        tc.key_width,
    )
    for i in range(tp.persons):
        assert tp.person_id(i) == tc.person_id(i)
        assert tp.is_guest(i) == tc.is_guest(i)
    for read in data.draw(st.lists(reads(cols, history), min_size=10, max_size=40)):
        assert pure.decide(tp, sp, *read) == compiled.decide(tc, sc, *read), read


@PROPS
@given(cols=columns(), probe=st.lists(read_keys, max_size=10))
def test_lookup_agrees_with_a_dict_model(fp, cols, probe):
    table = fp.Table(cols)
    person = dict(zip(cols.card_keys, cols.card_person))
    blocked = {k for k, f in zip(cols.card_keys, cols.card_flags) if f & codes.CARD_BLOCKED}
    assert len(table) == len(cols.card_keys)
    for key in list(cols.card_keys) + probe:
        assert table.lookup(key) == person.get(key, -1)
        assert table.is_blocked(key) == (key in blocked)


@PROPS
@given(data=st.data())
def test_decision_invariants(fp, data):
    cols = data.draw(columns())
    table = fp.Table(cols)
    history = data.draw(passages(cols))
    state = _state(fp, history)
    before = state.to_dict()
    for key, direction, mode, epoch, at, day, _busy, apb, window in data.draw(
        st.lists(reads(cols, history), min_size=1, max_size=10)
    ):
        idle = fp.decide(table, state, key, direction, mode, epoch, at, day, False, apb, window)
        busy = fp.decide(table, state, key, direction, mode, epoch, at, day, True, apb, window)
        # The index is always the card's person (or -1), whatever the result.
        assert idle[1] == table.lookup(key)
        if mode == FIRE:
            assert idle == busy == (GRANTED, table.lookup(key), codes.WARN_NONE)
            continue
        if mode == LOCKDOWN:
            assert idle[0] == busy[0] == LOCKDOWN_DENIED
            continue
        # Busy changes a grant into gate_busy and leaves every refusal as it was.
        if idle[0] == GRANTED:
            assert busy == (GATE_BUSY, idle[1], codes.WARN_NONE)
        else:
            assert busy == idle
        if idle[0] == UNKNOWN_CARD:
            assert table.lookup(key) == -1
        if idle[2]:
            assert idle[0] == GRANTED  # only a grant carries a warning
    assert state.to_dict() == before  # deciding never moves anybody


@PROPS
@given(data=st.data())
def test_state_follows_a_simple_model(fp, data):
    history = data.draw(passages(TableColumns(version="", person_ids=["a", "b"])))
    state = _state(fp, history)
    pos: dict[str, tuple[int, int]] = {}
    last: dict[str, int] = {}
    uses: dict[str, int] = {}
    for pid, direction, epoch, day, guest in history:
        pos[pid] = (POS_IN if direction == IN else POS_OUT, day)
        if direction == IN:
            last[pid] = epoch
            uses[pid] = uses.get(pid, 0) + (1 if guest else 0)
    for pid in ("a", "b", "stranger"):
        for day in range(DAY, DAY + 5):
            expected = pos[pid][0] if pid in pos and pos[pid][1] == day else POS_UNKNOWN
            assert state.position(pid, day) == expected
        assert state.last_entry(pid) == last.get(pid, 0)
        assert state.uses(pid) == uses.get(pid, 0)
    restored = fp.GateState.from_dict(state.to_dict())
    assert restored.to_dict() == state.to_dict()


@st.composite
def open_gate(draw):
    """A table where only anti-passback and guest uses can refuse, and a history.

    Everybody is valid and every schedule open, so random reads reach the
    anti-passback and guest checks far more often than on random tables.
    """
    n = draw(st.integers(1, 4))
    guest = [draw(st.booleans()) for _ in range(n)]
    cols = TableColumns(
        version="open",
        card_keys=array("Q", range(n)),
        card_person=array("i", range(n)),
        card_flags=array("B", [0] * n),
        person_ids=[f"p{i}" for i in range(n)],
        person_from=array("q", [NO_START] * n),
        person_until=array("q", [NO_END] * n),
        person_groupset=array("i", [0] * n),
        person_flags=array("B", [codes.PERSON_GUEST if g else 0 for g in guest]),
        person_max_uses=array("i", [draw(st.integers(0, 3)) for _ in range(n)]),
        gs_entry=[b"\xff" * BITMAP_BYTES],
        gs_entry_holiday=[bytes(BITMAP_BYTES)],
        gs_exit=[b"\xff" * BITMAP_BYTES],
    )
    step = st.tuples(
        st.integers(0, n - 1),
        st.sampled_from([IN, OUT]),
        st.integers(0, 600),
        st.integers(DAY, DAY + 1),
    )
    history = [
        (f"p{i}", direction, NOW + t, day, guest[i])
        for i, direction, t, day in draw(st.lists(step, min_size=1, max_size=10))
    ]
    return cols, history


@PROPS
@given(gate=open_gate(), data=st.data())
def test_anti_passback_and_guest_uses_follow_the_rules(fp, gate, data):
    cols, history = gate
    table, state = fp.Table(cols), _state(fp, history)
    read = st.tuples(
        st.integers(0, len(cols.person_ids) - 1),
        st.sampled_from([IN, OUT]),
        st.integers(0, 1200),
        st.integers(DAY, DAY + 1),
        st.booleans(),
        st.integers(0, len(APB_MODES) - 1),
        st.integers(0, 600),
    )
    for key, direction, t, day, busy, apb, window in data.draw(
        st.lists(read, min_size=5, max_size=30)
    ):
        epoch = NOW + t
        pid, guest = f"p{key}", bool(cols.person_flags[key])
        # The rules of docs/design.md#decision-rules, restated for this open gate.
        expected, warning = GRANTED, codes.WARN_NONE
        if not (guest and direction == OUT):
            max_uses = cols.person_max_uses[key]
            same_side = state.position(pid, day) == (POS_IN if direction == IN else POS_OUT)
            if guest and max_uses and state.uses(pid) >= max_uses:
                expected = codes.EXPIRED
            elif apb == codes.APB_HARD and same_side:
                expected = codes.ANTIPASSBACK
            elif apb == codes.APB_SOFT and same_side:
                warning = codes.WARN_ANTIPASSBACK
            elif (
                apb == codes.APB_TIMED
                and direction == IN
                and state.last_entry(pid)
                and epoch - state.last_entry(pid) < window
            ):
                expected = codes.ANTIPASSBACK
        if busy and expected == GRANTED:
            expected, warning = GATE_BUSY, codes.WARN_NONE
        result = fp.decide(table, state, key, direction, NORMAL, epoch, 0, day, busy, apb, window)
        assert result == (expected, key, warning)


@PROPS
@given(gate=open_gate(), data=st.data())
def test_twins_agree_on_an_open_gate(fp_pair, gate, data):
    pure, compiled = fp_pair
    cols, history = gate
    tp, tc = pure.Table(cols), compiled.Table(cols)
    sp, sc = _state(pure, history), _state(compiled, history)
    for read in data.draw(st.lists(reads(cols, history), min_size=5, max_size=30)):
        assert pure.decide(tp, sp, *read) == compiled.decide(tc, sc, *read), read


@st.composite
def rough_columns(draw) -> TableColumns:
    """Columns that may break any rule (unsorted keys, bad indices, bad lengths)."""
    n = draw(st.integers(0, 4))
    n_persons = draw(st.integers(0, 3))
    n_gs = draw(st.integers(0, 2))
    small = st.integers(-3, 5)
    return TableColumns(
        version="v",
        card_keys=array("Q", draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))),
        card_person=array(
            "i", draw(st.lists(small, min_size=n, max_size=n + draw(st.integers(0, 1))))
        ),
        card_flags=array("B", [0] * n),
        person_ids=[f"p{i}" for i in range(n_persons)],
        person_from=array("q", [NO_START] * n_persons),
        person_until=array("q", [NO_END] * n_persons),
        person_groupset=array("i", draw(st.lists(small, min_size=n_persons, max_size=n_persons))),
        person_flags=array("B", [0] * n_persons),
        person_max_uses=array("i", draw(st.lists(small, min_size=n_persons, max_size=n_persons))),
        gs_entry=[bytes(BITMAP_BYTES)] * n_gs,
        gs_entry_holiday=[bytes(BITMAP_BYTES)] * n_gs,
        gs_exit=[bytes(BITMAP_BYTES)] * n_gs,
        holidays=array("i", draw(st.lists(days, max_size=3))),
    )


def _build(twin, cols):
    try:
        twin.Table(cols)
    except ValueError as exc:
        return str(exc)
    return None


@PROPS
@given(cols=rough_columns())
def test_twins_accept_and_refuse_the_same_columns(fp_pair, cols):
    pure, compiled = fp_pair
    assert _build(pure, cols) == _build(compiled, cols)


def test_compiled_decide_refuses_a_table_of_the_other_twin(fp_pair):
    # Its C code reads the table's arrays directly: anything else must be refused.
    pure, compiled = fp_pair
    with pytest.raises(TypeError):
        compiled.decide(
            pure.Table(TableColumns(version="")),
            compiled.GateState(),
            1,
            IN,
            0,
            NOW,
            0,
            DAY,
            False,
            0,
            0,
        )
