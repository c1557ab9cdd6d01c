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

The list's parts live beside it: ``aclschema`` (refusals, the schema, JSON),
``acltime`` (schedules, dates, validity epochs), ``aclcheck`` (reading and
checking people, guests and cards, JSON and image alike), ``aclstore`` (the
columns). This module keeps ``AccessList`` itself, one class of some 650
lines on purpose: every way a list is made (snapshot, delta, image) and
everything it gives (columns, image, JSON) in one place, each a few methods
over the same columns; and the names the rest of the gate imports from here.
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Any
from zoneinfo import ZoneInfo

from fastpath.codes import (
    BITMAP_BYTES,
    PERSON_GUEST,
)
from fastpath.columns import TableChange, TableColumns

from . import aclstore
from .aclcheck import (
    DEFAULT_KEY_WIDTH,
    _check_model,
    _checked_image_people,
    _copy_json,
    _Guest,
    _items,
    _joined,
    _named,
    _Person,
    _Reader,
)
from .aclschema import (
    MAX_DEPTH,
    MAX_ERRORS,
    MAX_REPORTED_ERRORS,
    AclError,
    AclRejected,
    _check_schema,
    _Errors,
    _ptr,
    nesting_exceeds,
    parse_acl_json,
    schema,
)
from .aclstore import PeopleColumns
from .acltime import (
    _ALL_MINUTES,
    WEEKDAYS,
    _Epochs,
    _parse_date,
    _zone,
    minute_of_week,
    schedule_bitmap,
)

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


# --------------------------------------------------------------------------- AccessList

# Snapshot fields an image header carries (everything but the people).
_HEADER_FIELDS = (
    "version", "site", "generated", "timezone", "key_width", "schedules", "groups",
    "guests", "blocked", "holidays",
)
# An id of the schema's pattern: these bytes only, the first a letter or digit.


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
