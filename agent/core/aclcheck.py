"""Reading an access list's people, guests, schedules and cards, and checking
the rules a JSON Schema cannot say (a card held twice, a group that is not
defined, a validity that ends before it starts), for the JSON form and for
the compact image's columns alike. Every error is collected with its JSON
pointer (aclschema._Errors). Pure.

Some 610 lines on purpose: the same rules for the JSON form (``_Reader``,
``_check_model``) and for the image's columns (``_checked_image_people``),
side by side, so a rule changed in one is seen to need changing in the
other.
"""

from __future__ import annotations

import operator
import re
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple
from zoneinfo import ZoneInfo

from fastpath.codes import (
    NO_END,
    NO_START,
)

from . import aclstore
from .aclschema import (
    _WANTED,
    MAX_ERRORS,
    _Errors,
    _short,
    schema,
)
from .aclstore import PeopleColumns, all_pairs, any_zip, byte_slices, mapped, text_slices
from .acltime import (
    WEEKDAYS,
    _Epochs,
    _is_date,
    _parse_date,
    _range_minutes,
)
from .cards import CardFormatError, parse_card_string
from .records import parse_rfc3339

if TYPE_CHECKING:
    from .acl import AccessList


DEFAULT_KEY_WIDTH = 24

_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ID_REST = _ID_BYTES + b"_.:-"


# --------------------------------------------------------------------------- model


# A person as held: a plain tuple (id, cards, keys, groups, valid_from,
# valid_until). Plain, not a NamedTuple: a million must build fast (a tuple
# subclass costs a second per million) and stay small.
_Person = tuple
P_ID, P_CARDS, P_KEYS, P_GROUPS, P_FROM, P_UNTIL = range(6)


class _Guest(NamedTuple):
    id: str
    card: str
    key: int
    start: str  # "from"
    until: str
    uses: int
    groups: tuple[str, ...] | None

    def to_json(self) -> dict:
        d: dict[str, Any] = {
            "id": self.id,
            "card": self.card,
            "from": self.start,
            "until": self.until,
            "uses": self.uses,
        }
        if self.groups is not None:
            d["groups"] = list(self.groups)
        return d


class _Reader:
    """Turns document parts into model objects, reporting what it cannot read.

    Items the schema already refused are skipped quietly (their error is in);
    the checks here are the ones a schema cannot make. Paths are built only
    for errors: a million-person list must read in seconds."""

    def __init__(self, key_width: int, errors: _Errors) -> None:
        self.key_width = key_width
        self.errors = errors
        self._tuples: dict[
            tuple, tuple[str, ...] | None
        ] = {}  # shared group tuples; None: not all str
        self._good_validity: set[str] = set()  # validity strings already checked

    def _intern(self, items: list) -> tuple[str, ...] | None:
        t = tuple(items)
        try:
            got = self._tuples.get(t, False)
        except TypeError:  # an unhashable member: the schema reported it
            return None
        if got is False:
            got = t if all(type(x) is str for x in t) else None
            self._tuples[t] = got
        return got

    def key(self, text: Any, path: str) -> int | None:
        if type(text) is not str:
            return None  # the schema reported it
        try:
            return parse_card_string(text, self.key_width)
        except CardFormatError as exc:
            self.errors.add(path, str(exc))
            return None

    def _validity(self, value: Any, path: str, as_date_ok: bool = True) -> bool:
        if type(value) is not str:
            return False
        if value in self._good_validity:
            return True
        try:
            if as_date_ok and _is_date(value):
                _parse_date(value)
            else:
                parse_rfc3339(value)
        except ValueError:
            self.errors.add(path, f"{_short(value)} is not a real calendar date or time")
            return False
        if len(self._good_validity) < 100_000:  # bounded: datetimes may all differ
            self._good_validity.add(value)
        return True

    def person(self, p: Any, where: str, i: int) -> _Person | None:
        """The person at document path f"{where}/{i}", or None (errors reported)."""
        if type(p) is not dict:
            return None
        pid, cards, groups = p.get("id"), p.get("cards"), p.get("groups")
        if (
            type(pid) is not str
            or type(cards) is not list
            or type(groups) is not list
            or not groups
        ):
            return None
        # A person with a bad field still takes part in the cross checks (its
        # other errors are reported too); the document is refused anyway.
        keys = []
        parse, width = parse_card_string, self.key_width
        for c in cards:
            try:
                keys.append(parse(c, width))
            except CardFormatError as exc:
                if type(c) is str:  # else the schema reported it
                    self.errors.add(f"{where}/{i}/cards/{len(keys)}", str(exc))
                keys.append(object())  # a placeholder key that matches nothing
        vf, vu = p.get("valid_from"), p.get("valid_until")
        if vf is not None and not self._validity(vf, f"{where}/{i}/valid_from"):
            vf = None
        if vu is not None and not self._validity(vu, f"{where}/{i}/valid_until"):
            vu = None
        gt = self._intern(groups)
        if gt is None:
            return None
        return (pid, tuple(cards), tuple(keys), gt, vf, vu)

    def guest(self, g: Any, where: str, i: int) -> _Guest | None:
        """The guest at document path f"{where}/{i}", or None (errors reported)."""
        path = f"{where}/{i}"
        if not isinstance(g, dict) or not isinstance(g.get("id"), str):
            return None
        key = self.key(g.get("card"), f"{path}/card")
        ok = key is not None
        for field in ("from", "until"):
            if not self._validity(g.get(field), f"{path}/{field}", as_date_ok=False):
                ok = False
        uses, groups = g.get("uses"), g.get("groups")
        if not isinstance(uses, int) or isinstance(uses, bool) or uses < 1:
            ok = False
        gt = None
        if groups is not None:
            gt = self._intern(groups) if isinstance(groups, list) and groups else None
            ok = ok and gt is not None
        if not ok:
            return None
        return _Guest(g["id"], g["card"], key, g["from"], g["until"], uses, gt)

    def schedule(self, s: Any, path: str) -> bool:
        """True when the schedule's time ranges are usable."""
        if not isinstance(s, dict) or not isinstance(s.get("week"), dict):
            return False
        ok = True
        for day, ranges in s["week"].items():
            if day not in WEEKDAYS or not isinstance(ranges, list):
                ok = False
                continue
            for j, text in enumerate(ranges):
                try:
                    start, end = _range_minutes(text)
                except (ValueError, TypeError, AttributeError):
                    ok = False  # the schema reported the shape
                    continue
                if end <= start:
                    self.errors.add(
                        f"{path}/week/{day}/{j}",
                        f"time range {text!r} ends at or before it starts; a range is "
                        "start-end on one day (split ranges that cross midnight)",
                    )
                    ok = False
        return ok

    def dates(self, items: Any, path: str) -> list[str]:
        out = []
        for i, h in enumerate(items if isinstance(items, list) else ()):
            if isinstance(h, str):
                try:
                    _parse_date(h)
                except ValueError:
                    self.errors.add(f"{path}/{i}", f"{_short(h)} is not a real calendar date")
                    continue
                out.append(h)
        return out


def _items(doc: dict, field: str) -> list:
    """doc[field] when it is a list, else [] (a wrong type is the schema's error)."""
    value = doc.get(field)
    return value if isinstance(value, list) else []


def _named(doc: dict, field: str) -> dict:
    """doc[field] when it is an object, else {} (a wrong type is the schema's error)."""
    value = doc.get(field)
    return value if isinstance(value, dict) else {}


def _copy_json(value: Any) -> Any:
    """A deep copy of plain JSON (schedules and groups are small)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


# Where an item of the merged list came from: its path in the current
# document, or None for an item carried over from the base version.
_PathOf = Callable[[int, str], "str | None"]


def _check_model(
    *,
    people: list[_Person],
    guests: list[_Guest],
    groups: dict[str, dict],
    schedules: dict[str, dict],
    tz: ZoneInfo | None,
    errors: _Errors,
    person_path: _PathOf,
    guest_path: _PathOf,
    group_path: Callable[[str], str | None],
    base_version: str | None = None,
) -> None:
    """Cross-field rules over a whole (merged) list: ids, card keys, references, validity."""

    def report(path: str | None, what: str, message: str) -> None:
        if path is None:  # only a base item: say so, the delta cannot point at it
            errors.add("", f"{what} (carried over from base version {base_version!r}): {message}")
        else:
            errors.add(path, message)

    for name, g in groups.items():
        for direction in ("entry", "exit"):
            ref = g.get(direction)
            if isinstance(ref, str) and ref not in schedules:
                report(
                    None if group_path(name) is None else group_path(name) + "/" + direction,
                    f"group {name!r}",
                    f'schedule {ref!r} is not defined; add it to "schedules" or use null '
                    "(always allowed)",
                )

    # One pass over every holder; paths and messages are built only on errors.
    # A holder is a person index i, or a guest index j stored as ~j.
    ids: dict[str, int] = {}  # ids of people and guests share one space (GateState is keyed by id)
    owner: dict[int, int] = {}  # card key -> holder
    # With an unknown zone (reported already) only same-kind bounds compare safely.
    epochs = _Epochs(tz if tz is not None else ZoneInfo("UTC"))
    groups_ok: dict[tuple, bool] = {}

    def h_path(h: int) -> str | None:
        return person_path(h, people[h][P_ID]) if h >= 0 else guest_path(~h, guests[~h].id)

    def h_what(h: int) -> str:
        return f"person {people[h][P_ID]!r}" if h >= 0 else f"guest {guests[~h].id!r}"

    def h_id(h: int) -> str:
        return people[h][P_ID] if h >= 0 else guests[~h].id

    def card_at(h: int, key: int, j: int | None = None) -> tuple[str, str]:
        """(card string, path suffix) of holder h's card with this key (index j if known)."""
        if h < 0:
            return guests[~h].card, "/card"
        if j is None:
            j = people[h][P_KEYS].index(key)
        return people[h][P_CARDS][j], f"/cards/{j}"

    def conflict(h: int, other: int, message: Callable[[int, int], tuple[str, str]]) -> None:
        """Report a clash at h, or at the other holder when only that one is in this
        document (a delta). message(at, partner) -> (path suffix, text)."""
        at, partner = h, other
        if h_path(h) is None and h_path(other) is not None:
            at, partner = other, h
        suffix, text = message(at, partner)
        path = h_path(at)
        report(None if path is None else path + suffix, h_what(at), text)

    def check_id(h: int, hid: str) -> None:
        other = ids.get(hid)
        if other is None:
            ids[hid] = h
            return
        conflict(
            h,
            other,
            lambda at, partner: (
                "/id",
                (
                    f"id {hid!r} is used twice ({h_what(partner)} has it too); ids of people and "
                    "guests must be unique"
                ),
            ),
        )

    def check_key(h: int, key: int, j: int | None = None) -> None:
        other = owner.get(key)
        if other is None:
            owner[key] = h
            return
        places = {h: card_at(h, key, j), other: card_at(other, key)} if h != other else {}

        def message(at: int, partner: int) -> tuple[str, str]:
            if at == partner:  # one person lists the card twice
                (card, suffix), (first, _) = card_at(h, key, j), card_at(h, key)
                same = "the same card" if first == card else f"the same key as {first!r}"
                return suffix, (
                    f"card {card!r} (key {key}) is {same}, listed before for this "
                    "person; list each card once"
                )
            (card, suffix), (other_card, _) = places[at], places[partner]
            same = "the same card" if other_card == card else f"the same key as {other_card!r}"
            return suffix, (
                f"card {card!r} (key {key}) is {same}, held by {h_id(partner)!r}; a card "
                "belongs to one person or guest: remove one of them"
            )

        conflict(h, other, message)

    def bad_groups(names: tuple, h: int) -> None:
        path = h_path(h)
        for k, gname in enumerate(names):
            if gname not in groups:
                report(
                    None if path is None else f"{path}/groups/{k}",
                    h_what(h),
                    f'group {gname!r} is not defined; add it to "groups"',
                )

    def groups_defined(names: tuple) -> bool:
        ok = groups_ok.get(names)
        if ok is None:
            ok = groups_ok[names] = all(g in groups for g in names)
        return ok

    for i, (pid, _, pkeys, pgroups, vf, vu) in enumerate(people):
        check_id(i, pid)
        for j, key in enumerate(pkeys):
            if key in owner:
                check_key(i, key, j)
            else:
                owner[key] = i
        if not groups_defined(pgroups):
            bad_groups(pgroups, i)
        comparable = tz is not None or _is_date(vf or "") == _is_date(vu or "")
        if vf is not None and vu is not None and comparable and epochs.start(vf) >= epochs.end(vu):
            path = person_path(i, pid)
            report(
                None if path is None else path + "/valid_from",
                h_what(i),
                f"valid_from {vf!r} is not before valid_until {vu!r}",
            )

    for j, g in enumerate(guests):
        h = ~j
        check_id(h, g.id)
        check_key(h, g.key)
        if g.groups is not None and not groups_defined(g.groups):
            bad_groups(g.groups, h)
        if epochs.start(g.start) >= epochs.end(g.until):
            path = guest_path(j, g.id)
            report(
                None if path is None else path + "/from",
                h_what(h),
                f"from {g.start!r} is not before until {g.until!r}",
            )


def _joined(typecode: str, head: Any, tail: Any) -> Any:
    """A new column: `head` (an array or memoryview) then the values of `tail`."""
    tail = list(tail)
    n = len(head)
    out = aclstore.zeros(typecode, n + len(tail))
    aclstore.copy_into(out if isinstance(out, memoryview) else memoryview(out), 0,
                       aclstore.raw(head) if typecode == "B" else head, 0, n)
    for j, v in enumerate(tail):
        out[n + j] = v
    return out


def _checked_image_people(
    people: PeopleColumns, base: AccessList, errors: _Errors, *, trusted: bool
) -> PeopleColumns:
    """The people of an image checked against the rest of its list (`base`), errors
    into `errors`; the derived columns computed for a received image.

    Shape (every image): column lengths and offset ends agree, so no later read runs
    off a column. A received image also gets every rule a JSON snapshot gets, in
    passes over whole columns (a million people check in about two seconds)."""
    n = len(people.id_off) - 1
    m = len(people.card_keys)

    def shape(ok: bool, what: str) -> bool:
        if not ok:
            errors.add("/people", f"the image's people columns do not fit together: {what}; "
                       "send the list again")
        return ok

    if not (
        shape(n >= 0, "no id offsets")
        and shape(len(people.card_off) == n + 1, "card offsets")
        and shape(all(len(getattr(people, c)) == n for c in ("groups", "vf", "vu")),
                  "per-person columns")
        and shape(len(people.text_off) == m + 1, "card text offsets")
        and shape(people.id_off[0] == 0 and people.id_off[n] == len(people.id_blob), "id blob")
        and shape(people.card_off[0] == 0 and people.card_off[n] == m, "card keys")
        and shape(people.text_off[0] == 0 and people.text_off[m] == len(people.text_blob),
                  "card text blob")
    ):
        return people
    if trusted:
        shape(len(people.p_from) == n and len(people.p_until) == n
              and len(people.sorted_keys) == m, "derived columns")
        return people

    key_width = base.key_width
    tz = ZoneInfo(base.timezone)
    epochs = _Epochs(tz)
    reader = _Reader(key_width, errors)
    group_names = base._groups
    # Offsets never go back; each id 1..64 bytes; each person one card or more.
    for name, off in (("id_off", people.id_off), ("card_off", people.card_off),
                      ("text_off", people.text_off)):
        if not aclstore.shift_check(off):
            shape(False, f"{name} goes back")
            return people
    id_off = people.id_off
    short = any_zip(operator.ge, id_off[:n], id_off[1:])  # an empty id
    long_ = any_zip(operator.gt, id_off[1:], mapped("q", (64).__add__, id_off[:n]))
    # The id blob (ten MB for a million people) is never copied whole: one copy is
    # one long hold of the interpreter lock. It is read a piece at a time.
    ids_blob = aclstore.raw(people.id_blob)
    step = 1 << 18
    bad_chars = b"".join(bytes(ids_blob[c:c + step]).translate(None, _ID_REST)
                         for c in aclstore.chunks(0, len(ids_blob), step))
    firsts = bytes(mapped("B", ids_blob.__getitem__, id_off[:n])) if len(ids_blob) else b""
    if short or long_ or bad_chars or firsts.translate(None, _ID_BYTES):
        for i in range(n):
            pid = bytes(ids_blob[people.id_off[i]:people.id_off[i + 1]])
            if not (1 <= len(pid) <= 64 and not pid.translate(None, _ID_REST)
                    and pid[:1].translate(None, _ID_BYTES) == b""):
                errors.add(f"/people/{i}/id", f"{_short(pid.decode('utf-8', 'replace'))} is not "
                           f"{_WANTED['id']}")
        return people
    off = people.id_off
    ids = byte_slices(ids_blob, off, n)
    if not all_pairs(operator.lt, ids):
        for i in range(1, n):
            if ids[i] <= ids[i - 1]:
                what = ("is used twice; ids of people and guests must be unique"
                        if ids[i] == ids[i - 1] else f"comes after {ids[i - 1].decode()!r}: "
                        "an image lists people in ascending id order")
                errors.add(f"/people/{i}/id", f"id {ids[i].decode()!r} {what}")
    for j, g in enumerate(base._guests):  # guests against people: ids
        target = g.id.encode("utf-8")
        k = bisect_left(ids, target)
        if k < n and ids[k] == target:
            errors.add(f"/guests/{j}/id", f"id {g.id!r} is used twice (person {g.id!r} has it "
                       "too); ids of people and guests must be unique")
    aclstore.release(ids)
    co = people.card_off
    if any_zip(operator.ge, co[:n], co[1:]):
        for i in (i for i in range(n) if co[i] >= co[i + 1]):
            errors.add(f"/people/{i}/cards", "a person holds at least one card")
    # Group lists and validity strings: shared, few.
    gl_ok = []
    for k, names in enumerate(people.group_lists):
        ok = bool(names) and len(set(names)) == len(names) and all(
            type(x) is str and x in group_names for x in names)
        gl_ok.append(ok)
        if not ok:
            errors.add(f"/people/group_lists/{k}", f"{_short(list(names))} is not a list of "
                       'distinct groups defined in "groups"')
    ok_texts = [reader._validity(t, f"/people/texts/{k}") for k, t in enumerate(people.texts)]
    for name, col, low, high in (("groups", people.groups, 0, len(gl_ok)),
                                 ("vf", people.vf, -1, len(ok_texts)),
                                 ("vu", people.vu, -1, len(ok_texts))):
        step = aclstore.CHUNK
        parts = [(min(col[c:c + step]), max(col[c:c + step])) for c in aclstore.chunks(0, n, step)]
        if n and (min(p[0] for p in parts) < low or max(p[1] for p in parts) >= high):
            shape(False, f"{name} indexes past its table")
            return people
    # Cards: each string read again; its key must be the one sent. In bulk: one
    # regular-expression pass over all strings, one loop of builtins for the keys;
    # card by card (for the messages) only when that finds something wrong.
    to, co, keys = people.text_off, people.card_off, people.card_keys
    strs = text_slices(people.text_blob, to, m)
    bulk = _bulk_card_keys(strs, key_width) if m else []
    if bulk is None or any_zip(operator.ne, bulk, keys):
        parse = parse_card_string
        card_re = _card_pattern()
        for j, t in enumerate(strs):
            try:
                good = card_re.fullmatch(t) is not None and parse(t, key_width) == keys[j]
            except CardFormatError:
                good = False
            if not good:
                i = bisect_right(co, j) - 1
                errors.add(f"/people/{i}/cards/{j - co[i]}", f"{_short(t)} is not "
                           f"{_WANTED['card']} with key {keys[j]} at key width {key_width}")
                if len(errors.items) >= MAX_ERRORS:
                    break
    aclstore.release(bulk or [])
    sk = aclstore.sorted_array(keys)
    if m and not all_pairs(operator.ne, sk):
        seen: dict[int, int] = {}
        for j in range(m):
            i = bisect_right(co, j) - 1
            if keys[j] in seen:
                other = seen[keys[j]]
                who = "this person" if other == i else repr(people.id_at(other))
                errors.add(f"/people/{i}/cards/{j - co[i]}",
                           f"card {strs[j]!r} (key {keys[j]}) is held by {who} "
                           "too; a card belongs to one person or guest: remove one of them")
            else:
                seen[keys[j]] = i
    aclstore.release(strs)
    # Validity: epochs from the strings, in the list's zone.
    from_tab = [epochs.start(t) if ok else NO_START for t, ok in zip(people.texts, ok_texts)]
    until_tab = [epochs.end(t) if ok else NO_END for t, ok in zip(people.texts, ok_texts)]
    from_tab.append(NO_START)
    until_tab.append(NO_END)
    p_from = mapped("q", from_tab.__getitem__, people.vf)
    p_until = mapped("q", until_tab.__getitem__, people.vu)
    if any_zip(operator.ge, p_from, p_until):
        for i in (i for i in range(n) if p_from[i] >= p_until[i]):
            errors.add(f"/people/{i}/valid_from",
                       f"valid_from {people.texts[people.vf[i]]!r} is not before valid_until "
                       f"{people.texts[people.vu[i]]!r}")
    # Guests against people: cards.
    for j, g in enumerate(base._guests):
        k = bisect_left(sk, g.key)
        if k < m and sk[k] == g.key:
            errors.add(f"/guests/{j}/card", f"card {g.card!r} (key {g.key}) is held by a person "
                       "too; a card belongs to one person or guest: remove one of them")
    people.p_from, people.p_until, people.sorted_keys = p_from, p_until, sk
    return people


@lru_cache(maxsize=1)
def _card_pattern() -> Any:
    return re.compile(schema()["$defs"]["card"]["pattern"])


@lru_cache(maxsize=1)
def _cards_pattern() -> Any:
    """Any number of card strings, each followed by a newline (the schema's pattern)."""
    one = schema()["$defs"]["card"]["pattern"].lstrip("^").rstrip("$")
    return re.compile(f"(?:{one}\n)*")


def _bulk_card_keys(strs: list[str], key_width: int) -> list[int] | None:
    """The keys of card strings as parse_card_string gives them, or None when one
    of them is not a card string (the caller then reads them one by one)."""
    pattern = _cards_pattern()
    for c in aclstore.chunks(0, len(strs)):
        if pattern.fullmatch("\n".join(strs[c:c + aclstore.CHUNK]) + "\n") is None:
            return None
    mask = (1 << key_width) - 1
    fac_max = (1 << (key_width - 16)) - 1
    out: list = [0] * len(strs)  # at its final size (aclstore.mapped says why)
    for c in aclstore.chunks(0, len(strs)):
        part: list[int] = []
        put = part.append
        for t in strs[c:c + aclstore.CHUNK]:
            if t[0] == "h":
                put(int(t[4:], 16) & mask)
            elif "," in t:
                f, _, cn = t.partition(",")
                fi, ci = int(f), int(cn)
                if ci > 0xFFFF or fi > fac_max:
                    return None
                put((fi << 16) | ci)
            else:
                put(int(t) & mask)
        out[c:c + aclstore.CHUNK] = part
    return out
