"""The pure-Python fastpath twin: the readable reference.

The compiled twin (fastpath/_compiled.pyx) must give the same answer for every
input; tests/test_fastpath_props.py compares the two on random tables. Rules
follow docs/design.md#decision-rules: the checks run in a fixed order and the
first that fails names the reason.

Some 680 lines on purpose: it mirrors fastpath/_compiled.pyx part for part
(the checks of the columns, ``Table``, ``GateState``, ``decide``), so each
twin can be read against the other; it is not split for the same reason
the compiled twin is not.
"""

from __future__ import annotations

import operator
import sys
from array import array
from typing import Any

from . import codes as _codes
from .codes import (
    ANTIPASSBACK,
    APB_HARD,
    APB_MODES,
    APB_SOFT,
    APB_TIMED,
    BITMAP_BYTES,
    BLOCKED,
    CARD_BLOCKED,
    ENTRY_ONLY,
    EXIT_RESTRICTED,
    EXPIRED,
    FIRE,
    GATE_BUSY,
    GRANTED,
    HOLIDAY,
    IN,
    LOCKDOWN,
    LOCKDOWN_DENIED,
    MINUTES_PER_WEEK,
    MODES,
    NO_END,
    NO_START,
    NOT_YET_VALID,
    OUT,
    OUTSIDE_SCHEDULE,
    PERSON_GUEST,
    POS_IN,
    POS_OUT,
    POS_UNKNOWN,
    UNKNOWN_CARD,
    WARN_ANTIPASSBACK,
    WARN_NONE,
    WRONG_DIRECTION,
)
from .columns import TableColumns

__all__ = ["GateState", "Table", "decide", "sort_keys"]

# Every constant of fastpath.codes is also an attribute of this module, as of the
# compiled twin (a test checks both agree with codes.py).
globals().update({_n: _v for _n, _v in vars(_codes).items() if _n.isupper()})

_ZERO_BITMAP = bytes(BITMAP_BYTES)
STATE_FORMAT = 1  # GateState.to_dict()["format"]; bump when the layout changes


# --------------------------------------------------------------------------- columns


def _column(values: Any, typecode: str, name: str, copy: bool) -> Any:
    """`values` as an array of `typecode`; a copy when asked (a Table must not change).
    Without a copy, a C-contiguous memoryview of that format (e.g. of a mapped list
    file) is taken as it is."""
    if not copy:
        if isinstance(values, array) and values.typecode == typecode:
            return values
        if (isinstance(values, memoryview) and values.format == typecode
                and values.ndim == 1 and values.c_contiguous):
            return values
    try:
        if isinstance(values, memoryview) and values.format == typecode:
            out = array(typecode)
            out.frombytes(values.cast("B") if values.format != "B" else values)  # one copy
            return out
        return array(typecode, values)
    except (TypeError, OverflowError, ValueError) as exc:
        raise ValueError(
            f"TableColumns.{name}: cannot hold it as array({typecode!r}) ({exc}); "
            "build the columns with agent.core.acl"
        ) from None


def _bitmaps(values: Any, name: str) -> list[bytes]:
    out = []
    for i, bm in enumerate(values):
        try:
            bm = bytes(memoryview(bm))  # bytes-like only: bytes(1260) would be zeros
        except TypeError:
            raise ValueError(
                f"TableColumns.{name}[{i}] is {type(bm).__name__}, not bytes"
            ) from None
        if len(bm) != BITMAP_BYTES:
            raise ValueError(
                f"TableColumns.{name}[{i}] has {len(bm)} bytes; a weekly bitmap has "
                f"{BITMAP_BYTES} (one bit per minute of the week)"
            )
        out.append(bm)
    return out


_TYPECODES = {
    "card_keys": "Q",
    "card_person": "i",
    "card_flags": "B",
    "person_from": "q",
    "person_until": "q",
    "person_groupset": "i",
    "person_flags": "B",
    "person_max_uses": "i",
    "holidays": "i",
    "person_id_off": "Q",
    "person_card_off": "Q",
    "person_card_keys": "Q",
    "blocked_keys": "Q",
}


def _byte_blob(value: Any, name: str) -> memoryview:
    try:
        mv = memoryview(value)
    except TypeError:
        raise ValueError(f"TableColumns.{name} is {type(value).__name__}, not bytes") from None
    if not mv.c_contiguous:
        raise ValueError(f"TableColumns.{name} must be contiguous bytes")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def normalised(columns: TableColumns, copy: bool = True) -> dict[str, Any]:
    """The columns as typed arrays, lengths checked; ValueError naming the column.

    Shared by both twins. The per-entry checks (sorted keys, index ranges) are
    element_error() below, run by each twin at its own speed. Two forms
    (fastpath/columns.py): ids as a list of str or as one blob with offsets;
    cards sorted by key, or listed by person with the blocked keys apart
    (``c["by_person"]``).
    """
    if not isinstance(columns, TableColumns):
        raise TypeError(f"Table needs a fastpath.TableColumns, got {type(columns).__name__}")
    if not isinstance(columns.version, str):
        # A ValueError like every other bad column: one type for the caller to catch.
        raise ValueError('TableColumns.version must be a str ("" for no access list)')  # noqa: TRY004
    if not isinstance(columns.key_width, int) or not 1 <= columns.key_width <= 64:
        raise ValueError(f"TableColumns.key_width is {columns.key_width!r}; it must be 1..64 bits")

    c: dict[str, Any] = {
        name: _column(getattr(columns, name), tc, name, copy) for name, tc in _TYPECODES.items()
    }
    for name in ("gs_entry", "gs_entry_holiday", "gs_exit"):
        c[name] = _bitmaps(getattr(columns, name), name)
    ids = columns.person_ids
    blob = _byte_blob(columns.person_id_blob, "person_id_blob")
    id_off = c["person_id_off"]
    if len(id_off):
        if len(ids):
            raise ValueError("TableColumns: give person_ids or person_id_blob with person_id_off, "
                             "not both")
        if id_off[0] != 0 or id_off[len(id_off) - 1] != len(blob):
            raise ValueError(
                f"TableColumns.person_id_off must run from 0 to len(person_id_blob) "
                f"({len(blob)}); it runs from {id_off[0]} to {id_off[len(id_off) - 1]}"
            )
        step = 1 << 20  # a MB at a time: a twin is built beside a running gate thread
        if not all(bytes(blob[c:c + step]).isascii() for c in range(0, len(blob), step)):
            # ids are ASCII by the schema; else check each
            for i in range(len(id_off) - 1):
                try:
                    bytes(blob[id_off[i]:id_off[i + 1]]).decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"TableColumns person id {i} is not valid UTF-8") from None
        c["person_ids"] = None
        c["person_id_blob"] = blob
        n_ids = len(id_off) - 1
    else:
        if len(blob):
            raise ValueError("TableColumns.person_id_blob needs person_id_off")
        for i, pid in enumerate(ids):
            if not isinstance(pid, str):
                raise ValueError(f"TableColumns.person_ids[{i}] is {type(pid).__name__}, not str")  # noqa: TRY004
            if not pid.isascii():
                try:
                    pid.encode("utf-8")  # the compiled twin stores ids as UTF-8
                except UnicodeEncodeError:
                    raise ValueError(f"TableColumns.person_ids[{i}] is not valid Unicode") from None
        c["person_ids"] = ids
        c["person_id_blob"] = b""
        n_ids = len(ids)

    def same_length(names: tuple[str, ...], what: str, extra: dict | None = None) -> int:
        lengths = {n: len(c[n]) for n in names}
        lengths.update(extra or {})
        if len(set(lengths.values())) > 1:
            detail = ", ".join(f"{n}={v}" for n, v in lengths.items())
            raise ValueError(
                f"TableColumns {what} columns differ in length ({detail}); "
                f"each needs one entry per {what[:-1]}"
            )
        return next(iter(lengths.values()))

    c["n_cards"] = same_length(("card_keys", "card_person", "card_flags"), "cards")
    c["n_persons"] = same_length(
        ("person_from", "person_until", "person_groupset", "person_flags", "person_max_uses"),
        "persons",
        {"person_ids": n_ids},
    )
    c["n_groupsets"] = same_length(("gs_entry", "gs_entry_holiday", "gs_exit"), "groupsets")
    card_off, pkeys = c["person_card_off"], c["person_card_keys"]
    c["by_person"] = by_person = len(card_off) > 0
    if by_person:
        if c["n_cards"]:
            raise ValueError("TableColumns: give cards sorted (card_keys, card_person, card_flags) "
                             "or by person (person_card_off, person_card_keys), not both")
        if len(card_off) != c["n_persons"] + 1:
            raise ValueError(f"TableColumns.person_card_off has {len(card_off)} entries; it needs "
                             f"one per person and one more ({c['n_persons'] + 1})")
        if card_off[0] != 0 or card_off[len(card_off) - 1] != len(pkeys):
            raise ValueError(
                f"TableColumns.person_card_off must run from 0 to len(person_card_keys) "
                f"({len(pkeys)}); it runs from {card_off[0]} to {card_off[len(card_off) - 1]}"
            )
    elif len(pkeys) or len(c["blocked_keys"]):
        raise ValueError("TableColumns.person_card_keys and blocked_keys need person_card_off")
    return c


def element_error(name: str, i: int, value: int, bound: int) -> ValueError:
    """The error for entry `i` of column `name`; `bound` is the previous entry or the limit."""
    if name in ("card_keys", "holidays"):
        return ValueError(
            f"TableColumns.{name} must be sorted ascending and unique; "
            f"entry {i} ({value}) follows {bound}"
        )
    if name == "card_person":
        return ValueError(
            f"TableColumns.card_person[{i}] is {value}; it must be -1 (nobody) "
            f"or a person index below {bound}"
        )
    if name == "person_groupset":
        return ValueError(
            f"TableColumns.person_groupset[{i}] is {value}; it must be -1 (no group) "
            f"or a groupset index below {bound}"
        )
    if name in ("person_card_off", "person_id_off"):
        return ValueError(
            f"TableColumns.{name} must not decrease; entry {i} ({value}) follows {bound}"
        )
    if name == "blocked_keys":
        return ValueError(
            f"TableColumns.blocked_keys must be sorted ascending and unique; "
            f"entry {i} ({value}) follows {bound}"
        )
    if name == "person_max_uses":
        return ValueError(f"TableColumns.person_max_uses[{i}] is {value}; use 0 for unlimited")
    return ValueError(f"TableColumns.{name}[{i}] is {value}, which is out of range")


def validated(columns: TableColumns) -> dict[str, Any]:
    """normalised() (copied) plus every per-entry check, in plain Python."""
    c = normalised(columns, copy=True)
    for name in ("card_keys", "holidays", "blocked_keys"):
        col = c[name]
        for i in range(1, len(col)):
            if col[i - 1] >= col[i]:
                raise element_error(name, i, col[i], col[i - 1])
    for name in ("person_card_off", "person_id_off"):
        col = c[name]
        for i in range(1, len(col)):
            if col[i - 1] > col[i]:
                raise element_error(name, i, col[i], col[i - 1])
    for name, limit in (("card_person", c["n_persons"]), ("person_groupset", c["n_groupsets"])):
        for i, v in enumerate(c[name]):
            if not -1 <= v < limit:
                raise element_error(name, i, v, limit)
    for i, v in enumerate(c["person_max_uses"]):
        if v < 0:
            raise element_error("person_max_uses", i, v, 0)
    return c


# --------------------------------------------------------------------------- table


def _map_cards(person_of: dict, c: dict, persons: Any) -> None:
    """person_of[key] = p for each card of the given persons (cards listed by person);
    ValueError for a key someone already holds."""
    off, pkeys = c["person_card_off"], c["person_card_keys"]
    for p in persons:
        for j in range(off[p], off[p + 1]):
            k = pkeys[j]
            if k in person_of:
                raise ValueError(
                    f"TableColumns.person_card_keys[{j}] ({k}) is held twice; "
                    "a card belongs to one person (build the columns with agent.core.acl)"
                )
            person_of[k] = p


class Table:
    """The access list as an immutable card table (the reference twin: dicts)."""

    __slots__ = (
        "_blocked",
        "_entry",
        "_entry_holiday",
        "_exit",
        "_from",
        "_groupset",
        "_guest",
        "_holiday_open",
        "_holidays",
        "_ids",
        "_index",
        "_max_uses",
        "_n_cards",
        "_person_of",
        "_until",
        "key_width",
        "version",
    )

    def __init__(self, columns: TableColumns, base: Table | None = None,
                 change: Any = None) -> None:
        """The table of `columns`; with `base` and `change` (fastpath.TableChange)
        the base's cards are copied and patched for the changed persons only (the
        compiled twin's way; this twin mirrors it so the two can be compared)."""
        if hasattr(self, "version"):
            raise TypeError("a fastpath Table is immutable; build a new one")
        c = validated(columns)
        self.version: str = columns.version
        self.key_width: int = columns.key_width
        if base is not None and change is not None and c["by_person"]:
            if not isinstance(base, Table):
                raise TypeError(f"Table base must be a pure fastpath Table, not {type(base).__name__}")
            self._patch_from(base, change, c)
        elif c["by_person"]:
            # key -> person index, cards listed by person; blocked keys on the side.
            self._person_of = person_of = {}
            _map_cards(person_of, c, range(c["n_persons"]))
            self._blocked = frozenset(c["blocked_keys"])
            self._n_cards = len(person_of) + sum(1 for k in self._blocked if k not in person_of)
        else:
            self._n_cards = c["n_cards"]
            # key -> person index, for cards with a person; blocked keys on the side.
            self._person_of = {k: p for k, p in zip(c["card_keys"], c["card_person"]) if p >= 0}
            self._blocked = frozenset(
                k for k, f in zip(c["card_keys"], c["card_flags"]) if f & CARD_BLOCKED
            )
        if c["person_ids"] is None:  # one blob with offsets
            text, off = bytes(c["person_id_blob"]).decode("utf-8"), c["person_id_off"]
            if text.isascii():
                self._ids = tuple(text[off[i]:off[i + 1]] for i in range(len(off) - 1))
            else:
                blob = c["person_id_blob"]
                self._ids = tuple(
                    bytes(blob[off[i]:off[i + 1]]).decode("utf-8") for i in range(len(off) - 1)
                )
        else:
            self._ids = tuple(c["person_ids"])  # shares the str objects
        # id -> index; the first wins, as the compiled twin's search finds it.
        self._index = dict(zip(reversed(self._ids), range(len(self._ids) - 1, -1, -1)))
        self._from = c["person_from"]
        self._until = c["person_until"]
        self._groupset = c["person_groupset"]
        self._guest = c["person_flags"]
        self._max_uses = c["person_max_uses"]
        # An extra all-zero groupset at the end: groupset -1 (no group) lands on it.
        self._entry = tuple(c["gs_entry"]) + (_ZERO_BITMAP,)
        self._entry_holiday = tuple(c["gs_entry_holiday"]) + (_ZERO_BITMAP,)
        self._exit = tuple(c["gs_exit"]) + (_ZERO_BITMAP,)
        # Whether any group of the set opens on holidays; else a holiday says `holiday`.
        self._holiday_open = tuple(any(bm) for bm in self._entry_holiday)
        self._holidays = frozenset(c["holidays"])

    def _patch_from(self, base: Table, change: Any, c: dict) -> None:
        drop, add = list(change.drop), list(change.add)
        old_np, np_ = len(base._ids), c["n_persons"]
        if old_np - len(drop) != np_ - len(add):
            raise ValueError(f"TableChange: the base has {old_np} persons and drops {len(drop)}, "
                             f"the new columns have {np_} and add {len(add)}; they do not match")
        if drop != sorted(set(drop)) or any(not 0 <= i < old_np for i in drop):
            raise ValueError("TableChange.drop must be ascending base person indices")
        if add != sorted(set(add)) or any(not 0 <= i < np_ for i in add):
            raise ValueError("TableChange.add must be ascending new person indices")
        person_of = dict(base._person_of)
        for k in change.gone_keys:
            person_of.pop(k, None)
        gone, added = set(drop), set(add)
        kept_new = (j for j in range(np_) if j not in added)
        remap = {i: next(kept_new) for i in range(old_np) if i not in gone}
        if any(i != j for i, j in remap.items()):
            person_of = {k: remap[p] for k, p in person_of.items()}
        _map_cards(person_of, c, add)
        self._person_of = person_of
        self._blocked = frozenset(c["blocked_keys"])
        self._n_cards = len(person_of) + sum(1 for k in self._blocked if k not in person_of)

    def __len__(self) -> int:
        return self._n_cards

    def __repr__(self) -> str:
        return f"<Table version={self.version!r} cards={self._n_cards} persons={self.persons}>"

    @property
    def persons(self) -> int:
        return len(self._ids)

    def lookup(self, key: int) -> int:
        """The card's person index; -1 for an unknown card or a blocked card of nobody."""
        return self._person_of.get(operator.index(key), -1)

    def is_blocked(self, key: int) -> bool:
        return operator.index(key) in self._blocked

    def person_id(self, index: int) -> str:
        if not 0 <= index < len(self._ids):
            raise IndexError(f"person index {index} out of range (table has {len(self._ids)})")
        return self._ids[index]

    def is_guest(self, index: int) -> bool:
        if not 0 <= index < len(self._ids):
            raise IndexError(f"person index {index} out of range (table has {len(self._ids)})")
        return bool(self._guest[index] & PERSON_GUEST)

    def person_index(self, person_id: str) -> int:
        """The index of the person with this id, -1 when the table has none."""
        if not isinstance(person_id, str):
            raise TypeError(f"person_id must be a str, not {type(person_id).__name__}")
        return self._index.get(person_id, -1)

    def nbytes(self) -> int:
        """Rough memory held: containers, int keys, id strings, arrays, bitmaps."""
        size = sys.getsizeof(self._person_of) + sys.getsizeof(self._blocked)
        size += (len(self._person_of) + len(self._blocked)) * 32  # int objects, approx.
        size += sys.getsizeof(self._ids) + sum(map(sys.getsizeof, self._ids))
        size += sys.getsizeof(self._index)
        for arr in (self._from, self._until, self._groupset, self._guest, self._max_uses):
            size += sys.getsizeof(arr)
        size += 3 * len(self._entry) * (BITMAP_BYTES + 33)
        size += sys.getsizeof(self._holidays) + len(self._holidays) * 28
        return size

    # Used by decide(); the groupset index with -1 mapped to the empty set.
    def _gs(self, index: int) -> int:
        g = self._groupset[index]
        return g if g >= 0 else len(self._entry) - 1


# --------------------------------------------------------------------------- state


def _check_direction(direction: int) -> None:
    if direction != IN and direction != OUT:
        raise ValueError(f"direction is {direction!r}; use fastpath.codes.IN or OUT")


def _check_person_id(person_id: Any) -> None:
    if not isinstance(person_id, str):
        raise TypeError(f"person_id is {type(person_id).__name__}; use the person's id (a str)")


class GateState:
    """Anti-passback positions and guest uses, keyed by person id.

    Lives beside the immutable Table and outlives a table swap; only passages
    change it (record_passage), never decisions, so a grant that times out
    leaves the person where they were.
    """

    __slots__ = ("_last_entry", "_position", "_uses")

    def __init__(self) -> None:
        self._position: dict[str, tuple[int, int]] = {}  # pid -> (POS_IN/POS_OUT, local day)
        self._last_entry: dict[str, int] = {}  # pid -> epoch s of the last entry passage
        self._uses: dict[str, int] = {}  # guest pid -> entries spent

    def record_passage(
        self, person_id: str, direction: int, epoch_s: int, day: int, guest: bool
    ) -> None:
        """A card passage happened: move the person; an entry spends a guest use."""
        _check_direction(direction)
        _check_person_id(person_id)
        if direction == IN:
            self._position[person_id] = (POS_IN, day)
            self._last_entry[person_id] = epoch_s
            if guest:
                # Counted in int64, as the compiled twin and the state file hold it.
                self._uses[person_id] = min(self._uses.get(person_id, 0) + 1, NO_END)
        else:
            self._position[person_id] = (POS_OUT, day)

    def forget_movements(self) -> None:
        """Every position and last entry forgotten, guest uses kept: after an evacuation
        everybody is outside, most without a card read (docs/design.md#fire)."""
        self._position.clear()
        self._last_entry.clear()

    def position(self, person_id: str, day: int) -> int:
        """POS_IN / POS_OUT if set on `day`, else POS_UNKNOWN (a new day starts unknown)."""
        pos = self._position.get(person_id)
        if pos is None or pos[1] != day:
            return POS_UNKNOWN
        return pos[0]

    def last_entry(self, person_id: str) -> int:
        return self._last_entry.get(person_id, 0)

    def uses(self, person_id: str) -> int:
        return self._uses.get(person_id, 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able snapshot for the state file."""
        return state_to_dict(self._position, self._last_entry, self._uses)

    @classmethod
    def from_dict(cls, d: Any) -> GateState:
        """The state saved by to_dict(); ValueError saying what is wrong."""
        self = cls()
        self._position, self._last_entry, self._uses = state_from_dict(d)
        return self

    def __repr__(self) -> str:
        return f"<GateState positions={len(self._position)} guests={len(self._uses)}>"


def state_to_dict(position: dict, last_entry: dict, uses: dict) -> dict[str, Any]:
    """The state file layout, shared by both twins."""
    return {
        "format": STATE_FORMAT,
        "positions": {pid: [pos, day] for pid, (pos, day) in position.items()},
        "last_entry": dict(last_entry),
        "uses": dict(uses),
    }


def state_from_dict(d: Any) -> tuple[dict, dict, dict]:
    """(positions, last_entry, uses) from a state_to_dict() layout, checked."""
    fix = "; delete the gate state file to start with unknown positions"

    def bad(what: str) -> ValueError:
        return ValueError(f"gate state: {what}{fix}")

    if not isinstance(d, dict):
        raise bad(f"expected an object, got {type(d).__name__}")
    if d.get("format") != STATE_FORMAT:
        raise bad(f"format is {d.get('format')!r}, this agent reads format {STATE_FORMAT}")

    def is_int(v: Any) -> bool:
        # int64, as the compiled twin holds days and epoch seconds in C.
        return isinstance(v, int) and not isinstance(v, bool) and NO_START <= v <= NO_END

    def section(name: str) -> dict:
        sec = d.get(name, {})
        if not isinstance(sec, dict) or not all(isinstance(k, str) for k in sec):
            raise bad(f"{name!r} must be an object keyed by person id")
        return sec

    position = {}
    for pid, v in section("positions").items():
        if (
            not isinstance(v, (list, tuple))
            or len(v) != 2
            or v[0] not in (POS_IN, POS_OUT)
            or not all(is_int(x) for x in v)
        ):
            raise bad(f"positions[{pid!r}] is {v!r}; expected [{POS_IN} or {POS_OUT}, day]")
        position[pid] = (int(v[0]), int(v[1]))
    last_entry = {}
    for pid, v in section("last_entry").items():
        if not is_int(v):
            raise bad(f"last_entry[{pid!r}] is {v!r}; expected epoch seconds")
        last_entry[pid] = v
    uses = {}
    for pid, v in section("uses").items():
        if not is_int(v) or v < 0:
            raise bad(f"uses[{pid!r}] is {v!r}; expected a count >= 0")
        uses[pid] = v
    return position, last_entry, uses


# --------------------------------------------------------------------------- decision


def _minute_set(bitmap: bytes, minute: int) -> bool:
    # Bit i = minute i of the week: byte i // 8, mask 1 << (i % 8).
    return bool(bitmap[minute >> 3] & (1 << (minute & 7)))


def check_arguments(direction: int, mode: int, minute_of_week: int, apb_mode: int) -> None:
    """ValueError for a code out of range (both twins refuse the same inputs)."""
    _check_direction(direction)
    if not 0 <= mode < len(MODES):
        raise ValueError(f"mode is {mode!r}; use a fastpath.codes mode (0..{len(MODES) - 1})")
    if not 0 <= minute_of_week < MINUTES_PER_WEEK:
        raise ValueError(
            f"minute_of_week is {minute_of_week!r}; it must be 0..{MINUTES_PER_WEEK - 1}"
            " (Monday 00:00 is 0)"
        )
    if not 0 <= apb_mode < len(APB_MODES):
        raise ValueError(f"apb_mode is {apb_mode!r}; use a fastpath.codes APB_* mode")


def decide(
    table: Table,
    state: GateState,
    key: int,
    direction: int,
    mode: int,
    epoch_s: int,
    minute_of_week: int,
    day: int,
    busy: bool,
    apb_mode: int,
    apb_window_s: int,
) -> tuple[int, int, int]:
    """(result, person_index, warning) for one card read; checks in the order of docs/design.md#the-order-of-checks.

    Pure: reads `state`, never changes it (only a passage does, via
    state.record_passage). `epoch_s` is UTC seconds, `minute_of_week` and `day`
    (date ordinal) are local time.
    """
    check_arguments(direction, mode, minute_of_week, apb_mode)
    idx = table.lookup(key)
    if mode == FIRE:
        return GRANTED, idx, WARN_NONE  # recorded without a check: who evacuated
    if mode == LOCKDOWN:
        return LOCKDOWN_DENIED, idx, WARN_NONE
    if mode == ENTRY_ONLY and direction == OUT:
        return WRONG_DIRECTION, idx, WARN_NONE
    if table.is_blocked(key):
        return BLOCKED, idx, WARN_NONE
    if idx < 0:
        return UNKNOWN_CARD, -1, WARN_NONE

    pid = table._ids[idx]
    guest = bool(table._guest[idx] & PERSON_GUEST)
    # A guest can always leave: no validity, schedule or anti-passback check on exit.
    if not (guest and direction == OUT):
        if epoch_s < table._from[idx]:
            return NOT_YET_VALID, idx, WARN_NONE
        if epoch_s >= table._until[idx]:
            return EXPIRED, idx, WARN_NONE
        max_uses = table._max_uses[idx]
        if guest and max_uses > 0 and state.uses(pid) >= max_uses:
            return EXPIRED, idx, WARN_NONE

        gs = table._gs(idx)
        if direction == IN:
            if day in table._holidays:
                if not table._holiday_open[gs]:
                    return HOLIDAY, idx, WARN_NONE
                if not _minute_set(table._entry_holiday[gs], minute_of_week):
                    return OUTSIDE_SCHEDULE, idx, WARN_NONE
            elif not _minute_set(table._entry[gs], minute_of_week):
                return OUTSIDE_SCHEDULE, idx, WARN_NONE
        elif not _minute_set(table._exit[gs], minute_of_week):
            return EXIT_RESTRICTED, idx, WARN_NONE

        warning = WARN_NONE
        if apb_mode == APB_SOFT or apb_mode == APB_HARD:
            pos = state.position(pid, day)
            if (direction == IN and pos == POS_IN) or (direction == OUT and pos == POS_OUT):
                if apb_mode == APB_HARD:
                    return ANTIPASSBACK, idx, WARN_NONE
                warning = WARN_ANTIPASSBACK
        elif apb_mode == APB_TIMED and direction == IN:
            last = state.last_entry(pid)
            if last and epoch_s - last < apb_window_s:
                return ANTIPASSBACK, idx, WARN_NONE
    else:
        warning = WARN_NONE

    if busy:
        return GATE_BUSY, idx, WARN_NONE
    return GRANTED, idx, warning


def sort_keys(keys: Any) -> array:
    """array("Q") of the keys in ascending order (the compiled twin sorts without the lock)."""
    return array("Q", sorted(keys))
