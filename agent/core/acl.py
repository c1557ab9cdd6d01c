"""The access list: schema, validation, snapshots and deltas, compiled columns.

The regional server sends the list as JSON (docs/access-list.md): a whole
*snapshot*, or a *delta* against a named base version. This module checks a
document against the JSON Schema (agent/schemas/acl.schema.json) and against
the rules a schema cannot express, holds the result as an immutable
``AccessList``, and compiles it to ``fastpath.TableColumns`` for the hot path.

A document is taken whole or refused whole: ``AclRejected`` lists every error
found (up to MAX_ERRORS), each with the JSON pointer of the bad field, so the
server can fix them all in one go. The gate keeps deciding on the list it had.

Pure: standard library, ``jsonschema_rs`` (a validator, no I/O) and the core;
no clocks. Time zones come from ``zoneinfo`` (the tzdata package).
"""

from __future__ import annotations

import json
import math
import operator
import re
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from importlib import resources
from itertools import accumulate
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jsonschema_rs

from fastpath.codes import (
    BITMAP_BYTES,
    MINUTES_PER_WEEK,
    NO_END,
    NO_START,
    PERSON_GUEST,
)
from fastpath.columns import TableChange, TableColumns

from . import aclstore
from .aclstore import PeopleColumns, all_pairs, any_zip, mapped, slices
from .cards import CardFormatError, parse_card_string
from .records import parse_rfc3339

__all__ = [
    "DEFAULT_KEY_WIDTH",
    "MAX_DEPTH",
    "MAX_ERRORS",
    "MAX_REPORTED_ERRORS",
    "WEEKDAYS",
    "AccessList",
    "AclError",
    "AclRejected",
    "build_table",
    "check_document",
    "minute_of_week",
    "nesting_exceeds",
    "parse_acl_json",
    "schedule_bitmap",
    "schema",
]

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # index = datetime.weekday()
DEFAULT_KEY_WIDTH = 24
MAX_ERRORS = 1000  # errors kept per refusal; a broken million-card list must not flood memory
_SHOWN_IN_STR = 10  # errors quoted by str(AclRejected)
# The acl.rejected record (agent/schemas/event.schema.json) carries at most 50 errors, each
# path and message at most 1,000 characters; the messages are written to fit in 900.
MAX_REPORTED_ERRORS = 50
_RECORD_TEXT = 1000
_MAX_MESSAGE = 900
# Containers inside containers: a signed list is 6 deep (envelope, list, schedules, a
# schedule, week, a day's ranges). Deeper is an attack on the recursive parts (the JSON
# encoder, the schema validator that stops at 255), refused before any of them runs.
MAX_DEPTH = 32

_ALL_MINUTES = (1 << MINUTES_PER_WEEK) - 1


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class AclError:
    """One thing wrong with a document: the JSON pointer of the field and what to do."""

    path: str  # JSON pointer into the document, e.g. "/people/17/cards/0"; "" is the whole document
    message: str

    def __str__(self) -> str:
        return f"{self.path or '/'}: {self.message}"


class AclRejected(ValueError):
    """A document refused whole. ``code``: "invalid" or "base_mismatch"."""

    def __init__(
        self, errors: list[AclError], code: str = "invalid", total: int | None = None
    ) -> None:
        self.errors = list(errors)
        self.code = code
        self.total = len(self.errors) if total is None else total  # errors found, kept or not
        shown = "; ".join(str(e) for e in self.errors[:_SHOWN_IN_STR])
        more = self.total - min(len(self.errors), _SHOWN_IN_STR)
        tail = f"; and {more} more" if more > 0 else ""
        noun = "error" if self.total == 1 else "errors"
        super().__init__(f"access list refused ({code}), {self.total} {noun}: {shown}{tail}")

    def record_fields(self, version: object) -> dict:
        """The fields of the ``acl.rejected`` record for this refusal (the contract
        keeps at most MAX_REPORTED_ERRORS errors, paths and messages of at most 1,000
        characters)."""
        errors = [{"path": (e.path or "/")[:_RECORD_TEXT], "message": e.message[:_RECORD_TEXT]}
                  for e in self.errors[:MAX_REPORTED_ERRORS]]
        if not errors:
            errors = [{"path": "/", "message": str(self)[:_RECORD_TEXT]}]
        ok_version = isinstance(version, str) and 1 <= len(version) <= 128
        return {"version": version if ok_version else None, "code": self.code, "errors": errors}


class _Errors:
    """Collects errors, keeping the first MAX_ERRORS and counting the rest."""

    def __init__(self) -> None:
        self.items: list[AclError] = []
        self.total = 0
        self.schema_paths: set[str] = set()  # a field the schema refused gets no second error

    def add_schema(self, path: str, message: str) -> None:
        self.schema_paths.add(path)
        self._keep(path, message)

    def add(self, path: str, message: str) -> None:
        if path not in self.schema_paths:
            self._keep(path, message)

    def _keep(self, path: str, message: str) -> None:
        self.total += 1
        if len(self.items) < MAX_ERRORS:
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            self.items.append(AclError(path, message))

    def __bool__(self) -> bool:
        return self.total > 0

    def raise_if_any(self, code: str = "invalid") -> None:
        if self.total:
            raise AclRejected(self.items, code, self.total)


def _ptr(*parts: str | int) -> str:
    """A JSON pointer (RFC 6901) from path parts."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _short(value: Any) -> str:
    """A value quoted for a message, cut short (a message must stay readable)."""
    text = (
        json.dumps(value, ensure_ascii=False)
        if not isinstance(value, (dict, list))
        else type(value).__name__
    )
    return text if len(text) <= 60 else text[:57] + '..."'


# --------------------------------------------------------------------------- schema


@lru_cache(maxsize=1)
def _schema_text() -> str:
    return (resources.files("agent") / "schemas" / "acl.schema.json").read_text(encoding="utf-8")


def schema() -> dict:
    """The JSON Schema (draft 2020-12) of snapshots and deltas (a fresh copy)."""
    return json.loads(_schema_text())


@lru_cache(maxsize=3)
def _validator(kind: str | None) -> Any:
    """A validator for one kind, so errors point into that kind's fields
    (a oneOf failure alone would only say "matches neither")."""
    s = schema()
    if kind is not None:
        del s["oneOf"]
        s["$ref"] = f"#/$defs/{kind}"
    return jsonschema_rs.validator_for(s)


# Messages for schema failures, by the $defs entry that failed: what is wanted.
_WANTED = {
    "card": 'a card string: "100,60179" (facility,card), "0006613779" (10-digit EM-Marine print) '
    'or "hex:0A008EC793" (UID in hex)',
    "date": "a date YYYY-MM-DD (local date in the list's time zone)",
    "datetime": 'an RFC 3339 date-time with offset, e.g. "2026-09-01T07:00:00+07:00"',
    "date_or_datetime": 'a date YYYY-MM-DD or an RFC 3339 date-time with offset, e.g. "2026-09-01" '
    'or "2026-09-01T08:00:00+07:00"',
    "time_range": 'a time range "HH:MM-HH:MM" (24-hour, end exclusive, "24:00" allowed as end)',
    "name": "a name of letters, digits, '_', '.', '-' (at most 64, starting with a letter or digit)",
    "id": "a pseudonymous id of letters, digits, '_', '.', ':', '-' (at most 64)",
    "timezone": 'an IANA time zone name such as "Asia/Tomsk"',
    "key_width": "an integer key width from 24 to 64",
    "version": "a non-empty version string (at most 128 characters)",
}


def _schema_message(err: Any) -> str:
    sp = list(err.schema_path)
    keyword = sp[-1] if sp else ""
    where = sp[1] if len(sp) >= 2 and sp[0] == "$defs" else None
    if keyword == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _allowed_fields(sp[:-1])
        extra = err.message.split("(", 1)[-1].rstrip(")") if "(" in err.message else err.message
        msg = f"unknown field(s): {extra}; allowed here: {', '.join(allowed)}"
        if where in ("person", "guest"):
            msg += (
                " (the list holds pseudonymous ids and cards only: no names, photos or biometrics)"
            )
        return msg
    if keyword in ("pattern", "anyOf") and where in _WANTED:
        return f"{_short(err.instance)} is not {_WANTED[where]}"
    if keyword == "anyOf" and where == "group":
        return f"{_short(err.instance)} is not a schedule name or null"
    if keyword == "uniqueItems":
        return "lists the same entry twice; list each once"
    if keyword == "const" and sp[-2:] == ["kind", "const"]:
        return f'{_short(err.instance)}: "kind" must be "snapshot" or "delta"'
    return err.message


def _allowed_fields(def_path: list) -> list[str]:
    node: Any = schema()
    for part in def_path:
        node = node[part]
    return sorted(node.get("properties", {}))


def _check_schema(doc: Any, errors: _Errors) -> str | None:
    """Schema errors into `errors`; returns the document's kind when it has a known one."""
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in ("snapshot", "delta"):
        if not isinstance(doc, dict):
            errors.add("", f"an access list is a JSON object, not {type(doc).__name__}")
        else:
            errors.add("/kind", f'"kind" must be "snapshot" or "delta", got {_short(kind)}')
        return None
    try:
        for err in _validator(kind).iter_errors(doc):
            path = _ptr(*err.instance_path)
            if len(errors.items) < MAX_ERRORS:
                errors.add_schema(path, _schema_message(err))
            else:  # count it, skip building its message
                errors.schema_paths.add(path)
                errors.total += 1
    except (ValueError, RecursionError) as exc:
        # jsonschema_rs stops at 255 levels ("Recursion limit reached"): a document built
        # in code, since parse_acl_json refuses anything deeper than MAX_DEPTH.
        deep = isinstance(exc, RecursionError) or "ecursion" in str(exc)
        why = (f"nested too deep (a list nests 6 levels, this gate reads at most {MAX_DEPTH})"
               if deep else "send plain JSON values")
        errors.add("", f"cannot be checked ({str(exc)[:200]}): {why}")
        return None
    return kind


# --------------------------------------------------------------------------- JSON


def nesting_exceeds(value: Any, limit: int = MAX_DEPTH) -> bool:
    """True when JSON-made ``value`` nests dicts and lists more than ``limit`` deep.

    Level by level, no recursion (a million-card list takes about 0.6 s here,
    against 4 s to parse it)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    d, lst = dict, list
    while level:
        depth += 1
        if depth > limit:
            return True
        deeper: list = []
        keep = deeper.append
        for node in level:
            for item in node.values() if node.__class__ is d else node:
                cls = item.__class__
                if cls is d or cls is lst:
                    keep(item)
        level = deeper
    return False


def parse_acl_json(data: bytes | str) -> dict:
    """The document in `data`, or AclRejected("invalid") saying where the JSON breaks
    (or that it nests deeper than MAX_DEPTH)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AclRejected(
                [AclError("", f"not UTF-8 text (byte {exc.start}); send the list as UTF-8 JSON")]
            ) from None

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    too_deep = AclRejected(
        [AclError("", f"nested more than {MAX_DEPTH} levels deep (a signed list nests 6): "
                      "send the snapshot or delta of docs/access-list.md")]
    )
    try:
        doc = json.loads(data, parse_constant=no_constant)
    except json.JSONDecodeError as exc:
        raise AclRejected(
            [AclError("", f"not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")]
        ) from None
    except ValueError as exc:
        raise AclRejected([AclError("", f"not valid JSON: {exc}")]) from None
    except RecursionError:
        raise too_deep from None
    if not isinstance(doc, dict):
        raise AclRejected(
            [AclError("", f"an access list is a JSON object, not {type(doc).__name__}")]
        )
    if nesting_exceeds(doc):
        raise too_deep
    return doc


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


# --------------------------------------------------------------------------- AccessList

# Snapshot fields an image header carries (everything but the people).
_HEADER_FIELDS = (
    "version", "site", "generated", "timezone", "key_width", "schedules", "groups",
    "guests", "blocked", "holidays",
)
# An id of the schema's pattern: these bytes only, the first a letter or digit.
_ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_ID_REST = _ID_BYTES + b"_.:-"


class AccessList:
    """A validated access list. Immutable: ``apply_delta`` returns a new one.

    Build it with ``AccessList.from_snapshot(doc)`` (JSON) or
    ``AccessList.from_image(buf)`` (the binary image: a stored file or the
    compact wire form); compile it for the hot path with ``columns()`` or
    ``build_table(acl, fp)``. The people are held as columns
    (agent.core.aclstore.PeopleColumns), never as a Python object each.
    """

    __slots__ = (
        "_blocked",
        "_change",
        "_generated",
        "_groups",
        "_guests",
        "_holidays",
        "_key_width",
        "_people",
        "_schedules",
        "_site",
        "_timezone",
        "_version",
    )

    def __init__(
        self,
        *,
        version: str,
        timezone: str,
        key_width: int,
        schedules: dict,
        groups: dict,
        people: PeopleColumns,
        guests: tuple,
        blocked: tuple,
        holidays: tuple,
        site: str | None = None,
        generated: str | None = None,
        change: TableChange | None = None,
    ) -> None:
        """Internal: use from_snapshot or from_image (they validate). `change`: how
        this list's table differs from its base's (set by apply_delta; build_table
        patches the base's table with it)."""
        for name, value in (
            ("_change", change),
            ("_version", version),
            ("_site", site),
            ("_generated", generated),
            ("_timezone", timezone),
            ("_key_width", key_width),
            ("_schedules", schedules),
            ("_groups", groups),
            ("_people", people),
            ("_guests", guests),
            ("_blocked", blocked),
            ("_holidays", holidays),
        ):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("AccessList is immutable; apply_delta() returns a new one")

    def __repr__(self) -> str:
        c = self.counts()
        return (
            f"AccessList(version={self._version!r}, timezone={self._timezone!r}, "
            f"people={c['people']}, guests={c['guests']}, cards={c['cards']}, "
            f"blocked={c['blocked']})"
        )

    # -- reading

    @property
    def version(self) -> str:
        return self._version

    @property
    def timezone(self) -> str:
        return self._timezone

    @property
    def key_width(self) -> int:
        return self._key_width

    @property
    def site(self) -> str | None:
        return self._site

    @property
    def holidays(self) -> tuple[str, ...]:
        return self._holidays

    @property
    def people(self) -> PeopleColumns:
        """The people as columns, sorted by id (agent.core.aclstore)."""
        return self._people

    def counts(self) -> dict[str, int]:
        """people, guests, cards (held by people and guests) and blocked cards."""
        return {
            "people": self._people.n,
            "guests": len(self._guests),
            "cards": self._people.m + len(self._guests),
            "blocked": len(self._blocked),
        }

    def _header(self) -> dict:
        """The snapshot without its people (fresh objects)."""
        doc: dict[str, Any] = {"kind": "snapshot", "version": self._version}
        if self._site is not None:
            doc["site"] = self._site
        if self._generated is not None:
            doc["generated"] = self._generated
        doc["timezone"] = self._timezone
        doc["key_width"] = self._key_width
        doc["schedules"] = _copy_json(self._schedules)
        doc["groups"] = _copy_json(self._groups)
        doc["people"] = []
        doc["guests"] = [g.to_json() for g in self._guests]
        doc["blocked"] = [card for card, _ in self._blocked]
        doc["holidays"] = list(self._holidays)
        return doc

    def to_snapshot(self) -> dict:
        """The list as a snapshot document (fresh objects; from_snapshot reads it back).
        People come in id order."""
        doc = self._header()
        people = doc["people"]
        for pid, cards, _, groups, vf, vu in self._people.people():
            d = {"id": pid, "cards": list(cards), "groups": list(groups)}
            if vf is not None:
                d["valid_from"] = vf
            if vu is not None:
                d["valid_until"] = vu
            people.append(d)
        return doc

    def to_image(self, *, stored: dict | None = None, wire: bool = False) -> list[Any]:
        """The list as a binary image (agent.core.aclstore), a list of byte chunks.
        `stored`: what the file keeps beside the list (applied_at, kind, base);
        `wire`: leave out the columns a receiver computes (the compact wire form)."""
        header = self._header()
        del header["people"], header["kind"]
        if stored is not None:
            header["stored"] = stored
        return aclstore.encode(header, self._people, wire=wire)

    # -- building

    @classmethod
    def from_snapshot(cls, doc: Any) -> AccessList:
        """Validate a snapshot document; AclRejected("invalid") lists every error."""
        errors = _Errors()
        kind = _check_schema(doc, errors)
        if kind == "delta":
            errors.add(
                "/kind",
                "this is a delta; apply it to the list it names as base "
                "(AccessList.apply_delta), or send a snapshot",
            )
        if kind != "snapshot":
            errors.raise_if_any()
        key_width = doc.get("key_width", DEFAULT_KEY_WIDTH)
        if (
            not isinstance(key_width, int)
            or isinstance(key_width, bool)
            or not 24 <= key_width <= 64
        ):
            key_width = DEFAULT_KEY_WIDTH  # reported by the schema; read cards at the default
        reader = _Reader(key_width, errors)

        tz_name = doc.get("timezone")
        tz = _zone(tz_name) if isinstance(tz_name, str) else None
        if isinstance(tz_name, str) and tz is None:
            errors.add(
                "/timezone",
                f"unknown time zone {tz_name!r}; use an IANA name such as "
                '"Asia/Tomsk" (see `timedatectl list-timezones`)',
            )
        generated = doc.get("generated")
        if generated is not None:
            reader._validity(generated, "/generated", as_date_ok=False)

        schedules = _named(doc, "schedules")
        for name, s in schedules.items():
            reader.schedule(s, _ptr("schedules", name))
        groups = _named(doc, "groups")
        groups = {k: v for k, v in groups.items() if isinstance(v, dict)}

        people: list[_Person] = []
        people_pos: list[int] = []  # document index of each read person
        for i, p in enumerate(_items(doc, "people")):
            person = reader.person(p, "/people", i)
            if person is not None:
                people.append(person)
                people_pos.append(i)
        guests: list[_Guest] = []
        guests_pos: list[int] = []
        for i, g in enumerate(_items(doc, "guests")):
            guest = reader.guest(g, "/guests", i)
            if guest is not None:
                guests.append(guest)
                guests_pos.append(i)

        blocked: list[tuple[str, int]] = []
        seen_blocked: dict[int, int] = {}
        for i, card in enumerate(_items(doc, "blocked")):
            key = reader.key(card, f"/blocked/{i}")
            if key is None:
                continue
            if key in seen_blocked:
                errors.add(
                    f"/blocked/{i}",
                    f"card {card!r} (key {key}) is already blocked at "
                    f"/blocked/{seen_blocked[key]}; list each card once",
                )
                continue
            seen_blocked[key] = i
            blocked.append((card, key))
        holidays = reader.dates(doc.get("holidays"), "/holidays")

        _check_model(
            people=people,
            guests=guests,
            groups=groups,
            schedules=schedules,
            tz=tz,
            errors=errors,
            person_path=lambda i, _id: f"/people/{people_pos[i]}",
            guest_path=lambda i, _id: f"/guests/{guests_pos[i]}",
            group_path=lambda name: _ptr("groups", name),
        )
        errors.raise_if_any()
        epochs = _Epochs(tz)
        columns = PeopleColumns.build(people, epochs.start, epochs.end)
        del people
        return cls(
            version=doc["version"],
            site=doc.get("site"),
            generated=generated,
            timezone=tz_name,
            key_width=key_width,
            schedules=_copy_json(schedules),
            groups=_copy_json(groups),
            people=columns,
            guests=tuple(guests),
            blocked=tuple(blocked),
            holidays=tuple(holidays),
        )

    @classmethod
    def from_image(cls, buf: Any, *, trusted: bool = False) -> tuple[AccessList, dict]:
        """(list, what the file stored beside it) from a binary image: `buf` is any
        bytes-like object (a mapped file is read in place, not copied).

        aclstore.ImageError (a ValueError) for a torn, short or altered image. A
        received image (``trusted=False``) is checked as a snapshot is, person by
        person (AclRejected listing the errors, paths ``/people/<i>`` in id order);
        a stored one (``trusted=True``, checked before it was written and guarded by
        its checksum) only for its shape."""
        header, cols = aclstore.decode(buf)
        skeleton = {k: header[k] for k in _HEADER_FIELDS if k in header}
        skeleton["kind"] = "snapshot"
        skeleton["people"] = []
        stored = header.get("stored") if isinstance(header.get("stored"), dict) else {}
        base = cls.from_snapshot(skeleton)  # everything but the people, checked as JSON
        people = aclstore.people_from_image(header, cols)
        errors = _Errors()
        people = _checked_image_people(people, base, errors, trusted=trusted)
        errors.raise_if_any()
        return base._with(people=people), stored

    def _with(self, **changes: Any) -> AccessList:
        fields = {name[1:]: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return AccessList(**fields)

    def apply_delta(self, doc: Any) -> AccessList:
        """A new list: this one changed as the delta says. This one stays as it was.

        AclRejected("base_mismatch") when the delta's base is not this version
        (ask for a snapshot); AclRejected("invalid") listing every error else.
        A delta must match its base exactly: removing what is not there or
        adding what already is (a blocked card, a holiday) is an error too.
        Work and memory grow with the delta, not the list: untouched people are
        copied as runs of columns.
        """
        if (
            isinstance(doc, dict)
            and isinstance(doc.get("base"), str)
            and doc.get("kind") == "delta"
            and doc["base"] != self._version
        ):
            raise AclRejected(
                [
                    AclError(
                        "/base",
                        (
                            f"delta is against version {doc['base']!r} but this gate holds {self._version!r}; "
                            f"send a snapshot or a delta against {self._version!r}"
                        ),
                    )
                ],
                code="base_mismatch",
            )
        errors = _Errors()
        kind = _check_schema(doc, errors)
        if kind == "snapshot":
            errors.add("/kind", "this is a snapshot; load it with AccessList.from_snapshot")
        if kind != "delta":
            errors.raise_if_any()
        reader = _Reader(self._key_width, errors)

        tz_name = self._timezone
        if isinstance(doc.get("timezone"), str):
            tz_name = doc["timezone"]
        tz = _zone(tz_name)
        if tz is None:
            errors.add(
                "/timezone",
                f"unknown time zone {tz_name!r}; use an IANA name such as "
                '"Asia/Tomsk" (see `timedatectl list-timezones`)',
            )

        schedules = dict(self._schedules)
        new_schedules = _named(doc, "schedules")
        for name, s in new_schedules.items():
            reader.schedule(s, _ptr("schedules", name))
            schedules[name] = _copy_json(s)
        groups = dict(self._groups)
        new_groups = _named(doc, "groups")
        for name, g in new_groups.items():
            if isinstance(g, dict):
                groups[name] = _copy_json(g)

        base = self._people
        # People: removals (positions in the base columns), then upserts by id.
        drop: set[int] = set()
        for i, rid in enumerate(_items(doc, "remove_people")):
            if not isinstance(rid, str):
                continue
            pos = base.find(rid)
            if pos < 0:
                errors.add(
                    f"/remove_people/{i}",
                    f"no person {rid!r} in the base version; the delta does "
                    "not match it (send a snapshot)",
                )
            else:
                drop.add(pos)
        guests = {g.id: g for g in self._guests}
        delta_people: dict[str, int] = {}
        delta_guests: dict[str, int] = {}
        self._removals(doc, "remove_guests", guests, delta_guests, "guest", errors)
        upserts: dict[str, _Person] = {}
        for coll, field, read, origin in (
            (upserts, "people", reader.person, delta_people),
            (guests, "guests", reader.guest, delta_guests),
        ):
            removed = {x for x in _items(doc, f"remove_{field}") if isinstance(x, str)}
            for i, item in enumerate(_items(doc, field)):
                obj = read(item, f"/{field}", i)
                if obj is None:
                    continue
                oid = obj[0]  # the id, for people and guests alike
                if oid in origin:
                    errors.add(
                        f"/{field}/{i}/id",
                        f"id {oid!r} appears twice in this delta (also /{field}/{origin[oid]})",
                    )
                    continue
                if oid in removed:
                    errors.add(
                        f"/{field}/{i}/id",
                        f"id {oid!r} is both upserted and removed by this delta; do one",
                    )
                    continue
                origin[oid] = i
                coll[oid] = obj
        for pid in upserts:
            pos = base.find(pid)
            if pos >= 0:
                drop.add(pos)  # replaced

        blocked = self._blocked_after(doc, reader, errors)
        holidays = self._holidays_after(doc, reader, errors)

        new_people = list(upserts.values())
        guests_list = list(guests.values())
        # The rules over the changed part: new people, every guest, every group.
        _check_model(
            people=new_people,
            guests=guests_list,
            groups=groups,
            schedules=schedules,
            tz=tz,
            errors=errors,
            person_path=lambda i, pid: f"/people/{delta_people[pid]}",
            guest_path=lambda i, gid: (
                f"/guests/{delta_guests[gid]}" if gid in delta_guests else None
            ),
            group_path=lambda name: _ptr("groups", name) if name in new_groups else None,
            base_version=self._version,
        )
        # ... and against the people kept from the base, by bisection.
        gone_keys = {
            k for i in drop for k in base.card_keys[base.card_off[i]:base.card_off[i + 1]]
        }

        def kept_holder(key: Any) -> tuple[int, int] | None:
            if type(key) is not int or key in gone_keys or not base.holds_key(key):
                return None
            return base.holder_of(key)

        def clash(path: str, card: str, key: int, at: tuple[int, int]) -> None:
            other = base.person(at[0])
            other_card = other[1][at[1]]
            same = "the same card" if other_card == card else f"the same key as {other_card!r}"
            errors.add(
                path,
                f"card {card!r} (key {key}) is {same}, held by {other[0]!r}; a card "
                "belongs to one person or guest: remove one of them",
            )

        for pid, cards, keys, *_ in new_people:
            for j, key in enumerate(keys):
                at = kept_holder(key)
                if at is not None:
                    clash(f"/people/{delta_people[pid]}/cards/{j}", cards[j], key, at)
        for g in guests_list:
            if g.id not in delta_guests:
                continue  # carried over: it matched the base already
            path = f"/guests/{delta_guests[g.id]}"
            at = kept_holder(g.key)
            if at is not None:
                clash(f"{path}/card", g.card, g.key, at)
            pos = base.find(g.id)
            if pos >= 0 and pos not in drop:
                errors.add(
                    f"{path}/id",
                    f"id {g.id!r} is used twice (person {g.id!r} has it too); ids of people and "
                    "guests must be unique",
                )

        epochs = _Epochs(tz if tz is not None else ZoneInfo("UTC"))
        if tz is not None and tz_name != self._timezone:
            # Dates are local: the kept people's bounds move with the zone.
            base = base.retimed(epochs.start, epochs.end)
            pf, pu = base.p_from, base.p_until
            for i in range(base.n):
                if pf[i] >= pu[i] and i not in drop:
                    pid, _, _, _, vf, vu = base.person(i)
                    errors.add(
                        "",
                        f"person {pid!r} (carried over from base version {self._version!r}): "
                        f"valid_from {vf!r} is not before valid_until {vu!r}",
                    )
        errors.raise_if_any()
        placed: list[int] = []
        spare = (len(guests_list), sum(len(g.id.encode("utf-8")) for g in guests_list))
        people = base.merge(drop, new_people, epochs.start, epochs.end, placed=placed, spare=spare)
        change = None
        if tz_name == self._timezone:
            # How the table changes: the dropped people and every guest out, the
            # placed people and every guest in (guests come after the people).
            old_n, new_n = self._people.n, people.n
            gone = array("Q", sorted(gone_keys))
            gone.extend(g.key for g in self._guests)
            change = TableChange(
                drop=array("q", sorted(drop)) + array("q", range(old_n, old_n + len(self._guests))),
                add=array("q", sorted(placed)) + array("q", range(new_n, new_n + len(guests_list))),
                gone_keys=gone,
                old_blocked=array("Q", [key for _, key in self._blocked]),
            )
        return AccessList(
            version=doc["version"],
            site=self._site,
            generated=None,
            timezone=tz_name,
            key_width=self._key_width,
            schedules=schedules,
            groups=groups,
            people=people,
            guests=tuple(guests_list),
            blocked=blocked,
            holidays=holidays,
            change=(self._version, change) if change is not None else None,
        )

    @staticmethod
    def _removals(
        doc: dict, field: str, coll: dict, origin: dict, what: str, errors: _Errors
    ) -> None:
        for i, rid in enumerate(_items(doc, field)):
            if not isinstance(rid, str):
                continue
            if rid not in coll:
                errors.add(
                    f"/{field}/{i}",
                    f"no {what} {rid!r} in the base version; the delta does "
                    "not match it (send a snapshot)",
                )
                continue
            del coll[rid]

    def _blocked_after(self, doc: dict, reader: _Reader, errors: _Errors) -> tuple:
        current = {key: card for card, key in self._blocked}
        unblock: dict[int, int] = {}
        for i, card in enumerate(_items(doc, "unblock")):
            key = reader.key(card, f"/unblock/{i}")
            if key is None:
                continue
            if key not in current:
                errors.add(
                    f"/unblock/{i}",
                    f"card {card!r} (key {key}) is not blocked in the base "
                    "version; the delta does not match it (send a snapshot)",
                )
            unblock[key] = i
        added: list[tuple[str, int]] = []
        for i, card in enumerate(_items(doc, "block")):
            key = reader.key(card, f"/block/{i}")
            if key is None:
                continue
            if key in unblock:
                errors.add(
                    f"/block/{i}",
                    f"card {card!r} is both blocked and unblocked "
                    f"(/unblock/{unblock[key]}) by this delta; do one",
                )
            elif key in current:
                errors.add(
                    f"/block/{i}",
                    f"card {card!r} (key {key}) is already blocked (as "
                    f"{current[key]!r}) in the base version",
                )
            elif any(k == key for _, k in added):
                errors.add(f"/block/{i}", f'card {card!r} (key {key}) is listed twice in "block"')
            else:
                added.append((card, key))
        return tuple(b for b in self._blocked if b[1] not in unblock) + tuple(added)

    def _holidays_after(self, doc: dict, reader: _Reader, errors: _Errors) -> tuple:
        current = set(self._holidays)
        remove = reader.dates(doc.get("holidays_remove"), "/holidays_remove")
        add = reader.dates(doc.get("holidays_add"), "/holidays_add")
        for i, h in enumerate(_items(doc, "holidays_remove")):
            if isinstance(h, str) and h in remove and h not in current:
                errors.add(f"/holidays_remove/{i}", f"{h} is not a holiday in the base version")
        for i, h in enumerate(_items(doc, "holidays_add")):
            if not isinstance(h, str) or h not in add:
                continue
            if h in current:
                errors.add(f"/holidays_add/{i}", f"{h} is already a holiday in the base version")
            elif h in remove:
                errors.add(f"/holidays_add/{i}", f"{h} is both added and removed by this delta")
        gone = set(remove)
        return tuple(h for h in self._holidays if h not in gone) + tuple(
            h for h in add if h not in current
        )

    # -- compiling

    def columns(self) -> TableColumns:
        """The list compiled to fastpath columns (fastpath/columns.py): ids as one
        blob, cards by person; people (in id order) first, then guests. Without
        guests the people's columns are handed over as they are (no copy)."""
        tz = ZoneInfo(self._timezone)
        epochs = _Epochs(tz)
        bitmaps = {
            name: int.from_bytes(schedule_bitmap(s), "little")
            for name, s in self._schedules.items()
        }
        gs_entry: list[bytes] = []
        gs_entry_holiday: list[bytes] = []
        gs_exit: list[bytes] = []
        made: dict[tuple[str, ...], tuple[bytes, bytes, bytes]] = {}

        def add_groupset(names: tuple[str, ...]) -> int:
            """A groupset for this list of names (the people's lists keep their index);
            () is the unrestricted set of a guest."""
            canon = tuple(sorted(set(names)))
            maps = made.get(canon)
            if maps is not None:
                return gs_of[canon]
            if maps is None:
                if not canon:
                    entry, holiday, exit_ = _ALL_MINUTES, 0, _ALL_MINUTES
                else:
                    entry = holiday = exit_ = 0
                    for gname in canon:
                        g = self._groups[gname]
                        e, x = g.get("entry"), g.get("exit")
                        entry |= _ALL_MINUTES if e is None else bitmaps[e]
                        if e is not None and self._schedules[e].get("holidays") is True:
                            holiday |= bitmaps[e]
                        exit_ |= _ALL_MINUTES if x is None else bitmaps[x]
                maps = made[canon] = (
                    entry.to_bytes(BITMAP_BYTES, "little"),
                    holiday.to_bytes(BITMAP_BYTES, "little"),
                    exit_.to_bytes(BITMAP_BYTES, "little"),
                )
            gs_entry.append(maps[0])
            gs_entry_holiday.append(maps[1])
            gs_exit.append(maps[2])
            gs_of[canon] = len(gs_entry) - 1
            return gs_of[canon]

        gs_of: dict[tuple[str, ...], int] = {}
        P = self._people
        remap = [add_groupset(names) for names in P.group_lists]
        # One groupset per set of groups, whatever the order in a person's list; the
        # people's column is passed as it is when no two lists name the same set.
        person_gs = P.groups
        if remap != list(range(len(remap))):
            person_gs = array("i", map(remap.__getitem__, P.groups))
        n = P.n
        blocked_keys = array("Q", sorted({key for _, key in self._blocked}))
        holidays = array("i", sorted(_parse_date(h).toordinal() for h in self._holidays))
        common = {
            "version": self._version,
            "key_width": self._key_width,
            "gs_entry": gs_entry,
            "gs_entry_holiday": gs_entry_holiday,
            "gs_exit": gs_exit,
            "holidays": holidays,
            "blocked_keys": blocked_keys,
        }
        if not self._guests:
            return TableColumns(
                person_id_blob=P.id_blob,
                person_id_off=P.id_off,
                person_card_off=P.card_off,
                person_card_keys=P.card_keys,
                person_from=P.p_from,
                person_until=P.p_until,
                person_groupset=person_gs,
                person_flags=array("B", bytes(n)),
                person_max_uses=array("i", bytes(4 * n)),
                **common,
            )
        gid = [g.id.encode("utf-8") for g in self._guests]
        # The people's columns with the guests' entries after them: each copied once, a
        # MB at a time, into memory the kernel zeroed (aclstore.zeros).
        # A list made by a delta has room for them after its own columns (merge's
        # `spare`): written there, nothing copied.
        def joined(name: str, tc: str, head: Any, tail: Any) -> Any:
            tail = list(tail)
            out = P.grown(name, head, tail)
            return out if out is not None else _joined(tc, head, tail)

        flags = aclstore.zeros("B", n + len(gid))
        max_uses = aclstore.zeros("i", n + len(gid))
        for j, g in enumerate(self._guests):
            flags[n + j] = PERSON_GUEST
            max_uses[n + j] = g.uses
        return TableColumns(
            person_id_blob=joined("id_blob", "B", P.id_blob, b"".join(gid)),
            person_id_off=joined("id_off", "Q", P.id_off,
                                 list(accumulate(map(len, gid), initial=P.id_off[n]))[1:]),
            person_card_off=joined("card_off", "Q", P.card_off, range(P.m + 1, P.m + 1 + len(gid))),
            person_card_keys=joined("card_keys", "Q", P.card_keys, [g.key for g in self._guests]),
            person_from=joined("p_from", "q", P.p_from, [epochs.start(g.start) for g in self._guests]),
            person_until=joined("p_until", "q", P.p_until, [epochs.end(g.until) for g in self._guests]),
            person_groupset=joined("groups", "i", person_gs,
                                   [add_groupset(g.groups or ()) for g in self._guests]),
            person_flags=flags,
            person_max_uses=max_uses,
            **common,
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
    ids_blob = bytes(people.id_blob)
    step = 1 << 20  # a MB per C call: the gate thread may take the lock in between
    bad_chars = b"".join(ids_blob[c:c + step].translate(None, _ID_REST)
                         for c in range(0, len(ids_blob), step))
    firsts = bytes(mapped("B", ids_blob.__getitem__, id_off[:n])) if ids_blob else b""
    if short or long_ or bad_chars or firsts.translate(None, _ID_BYTES):
        for i in range(n):
            pid = ids_blob[people.id_off[i]:people.id_off[i + 1]]
            if not (1 <= len(pid) <= 64 and not pid.translate(None, _ID_REST)
                    and pid[:1].translate(None, _ID_BYTES) == b""):
                errors.add(f"/people/{i}/id", f"{_short(pid.decode('utf-8', 'replace'))} is not "
                           f"{_WANTED['id']}")
        return people
    off = people.id_off
    ids = slices(ids_blob, off, n)
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
        parts = [(min(col[c:c + step]), max(col[c:c + step])) for c in range(0, n, step)]
        if n and (min(p[0] for p in parts) < low or max(p[1] for p in parts) >= high):
            shape(False, f"{name} indexes past its table")
            return people
    # Cards: each string read again; its key must be the one sent. In bulk: one
    # regular-expression pass over all strings, one loop of builtins for the keys;
    # card by card (for the messages) only when that finds something wrong.
    texts = _text_of(people.text_blob)
    to, co, keys = people.text_off, people.card_off, people.card_keys
    strs = slices(texts, to, m)
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
    aclstore.release(strs)
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
                           f"card {texts[to[j]:to[j + 1]]!r} (key {keys[j]}) is held by {who} "
                           "too; a card belongs to one person or guest: remove one of them")
            else:
                seen[keys[j]] = i
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


def _text_of(blob: Any) -> str:
    """The card strings' blob as text, decoded a MB at a time when it is ASCII (as
    the schema's card strings are): no single 10 MB pass holding the lock."""
    mv = aclstore.raw(blob)
    step = 1 << 20
    parts = [bytes(mv[c:c + step]) for c in range(0, len(mv), step)]
    if all(p.isascii() for p in parts):
        return "".join([p.decode("ascii") for p in parts])
    return b"".join(parts).decode("utf-8", "replace")


def _bulk_card_keys(strs: list[str], key_width: int) -> list[int] | None:
    """The keys of card strings as parse_card_string gives them, or None when one
    of them is not a card string (the caller then reads them one by one)."""
    pattern = _cards_pattern()
    for c in range(0, len(strs), aclstore.CHUNK):
        if pattern.fullmatch("\n".join(strs[c:c + aclstore.CHUNK]) + "\n") is None:
            return None
    mask = (1 << key_width) - 1
    fac_max = (1 << (key_width - 16)) - 1
    out: list[int] = []
    put = out.append
    for t in strs:
        if t[0] == "h":
            put(int(t[4:], 16) & mask)
        elif "," in t:
            f, _, c = t.partition(",")
            fi, ci = int(f), int(c)
            if ci > 0xFFFF or fi > fac_max:
                return None
            put((fi << 16) | ci)
        else:
            put(int(t) & mask)
    return out


def check_document(doc: Any, key_width: int = DEFAULT_KEY_WIDTH) -> list[AclError]:
    """Every error in a snapshot, or in a delta as far as it can be checked
    without its base (cards read at `key_width`); [] when none. For tools
    (a command-line check)."""
    errors = _Errors()
    kind = _check_schema(doc, errors)
    if kind == "snapshot":
        try:
            AccessList.from_snapshot(doc)
        except AclRejected as exc:
            return exc.errors
        return []
    if kind == "delta" and not errors:
        reader = _Reader(key_width, errors)
        for name, s in _named(doc, "schedules").items():
            reader.schedule(s, _ptr("schedules", name))
        for field, read in (("people", reader.person), ("guests", reader.guest)):
            for i, item in enumerate(_items(doc, field)):
                read(item, f"/{field}", i)
        for field in ("block", "unblock"):
            for i, card in enumerate(_items(doc, field)):
                reader.key(card, f"/{field}/{i}")
        for field in ("holidays_add", "holidays_remove"):
            reader.dates(doc.get(field), f"/{field}")
        if isinstance(doc.get("timezone"), str) and _zone(doc["timezone"]) is None:
            errors.add("/timezone", f"unknown time zone {doc['timezone']!r}")
    return errors.items


def build_table(acl: AccessList, fp: Any, base: Any = None) -> Any:
    """A fastpath Table of the list; `fp` is a twin module (fastpath or fastpath._pure).

    `base`: the table in use. When `acl` came from a delta on that table's list,
    the new table is the base's patched for the changed persons (fastpath
    TableChange), not built from every card; the base is left as it was."""
    change = acl._change
    if base is not None and change is not None and change[0] == base.version:
        return fp.Table(acl.columns(), base=base, change=change[1])
    return fp.Table(acl.columns())


# --------------------------------------------------------------------------- bench helper
