"""The people of an access list as columns, and the binary image of a whole list.

What a gate holds of a million cards (docs/access-list.md, "How a gate holds
the list"): no Python object per person or card, only a few flat columns,
people sorted by id so an id is found by binary search:

- ids: one ASCII blob (``id_blob``) with ``n + 1`` offsets (``id_off``);
- cards: ``card_off`` (``n + 1`` offsets) into ``card_keys`` (the keys, in
  each person's order) and into the card strings as sent (``text_blob`` with
  ``text_off``: ``to_snapshot`` gives them back as they came);
- ``groups``: an index into ``group_lists`` (each person's list of group
  names, shared); ``vf``/``vu``: an index into ``texts`` (validity strings,
  shared; -1: none); ``p_from``/``p_until``: the same as UTC epoch seconds;
- ``sorted_keys``: every person's card keys sorted, so a delta checks a new
  card against the list by bisection.

A delta changes a few people: ``merge`` copies the untouched runs with slices
(memcpy) and shifts their offsets with one big-integer addition per run (no
Python loop over a million entries).

The *image* (``encode``/``decode``) is these columns after a small JSON
header, in one checksummed binary layout: the file kept on disk (mapped, not
parsed, at start) and, zlib-compressed, the compact wire form of a snapshot.
Pure: standard library only, no I/O (the caller maps or reads the bytes).

Some 800 lines on purpose: one format. The columns, their merge and the
image are one layout (typecodes, offsets, padding) written and read in one
place: the image's decoder hands its columns straight to ``PeopleColumns``,
and a split would put the two sides of every column's layout in two files.
The delta log's small record format (``encode_record``/``read_records``)
sits beside it.
"""

from __future__ import annotations

import binascii
import json
import operator
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate, chain, islice
from typing import Any

import fastpath
from fastpath.codes import NO_END, NO_START

__all__ = ["IMAGE_MAGIC", "ImageError", "PeopleColumns", "decode", "encode"]

IMAGE_MAGIC = b"GATEACL\x00"
IMAGE_FORMAT = 1
# magic, format, header length, body length, crc32 of the body (header and columns).
_PREFIX = struct.Struct("<8sIIQI4x")
_ALIGN = 8
_SMALL_RUN = 48  # below this many offsets a plain loop beats the big-integer shift

# Column name -> array typecode, in image order. Those marked derived are left
# out of the wire form: the receiver computes them (it trusts none of them).
_COLUMNS = (
    ("id_blob", "B"),
    ("id_off", "Q"),
    ("card_off", "Q"),
    ("card_keys", "Q"),
    ("text_blob", "B"),
    ("text_off", "Q"),
    ("groups", "i"),
    ("vf", "i"),
    ("vu", "i"),
    ("p_from", "q"),
    ("p_until", "q"),
    ("sorted_keys", "Q"),
)
DERIVED = frozenset({"p_from", "p_until", "sorted_keys"})


class ImageError(ValueError):
    """A list image that is not whole: bad magic, format, length or checksum."""


def raw(values: Any) -> memoryview:
    """The bytes of an array or memoryview (array.frombytes takes bytes only)."""
    mv = memoryview(values)
    return mv if mv.format == "B" else mv.cast("B")


# Work over a million entries runs in chunks of this many: each C-level pass over
# a chunk takes a few tenths of a millisecond, so the interpreter lock can pass to
# the gate thread between chunks (a list is built beside a gate that keeps deciding).
# Every time the gate thread lets the lock go inside one event (its journal commit,
# a write), it waits for the chunk under way to end: a short chunk keeps that short.
CHUNK = 1 << 11

_pace: Callable[[], None] | None = None


def use_pacer(pace: Callable[[], None] | None) -> None:
    """``pace()`` is called between two chunks of every long pass (``chunks``): the
    service gives one that waits while the gate thread has an event in hand, so a
    list being checked never makes a card wait more than one chunk. The core itself
    never waits (None, the default: no pause)."""
    global _pace
    _pace = pace


def pacer() -> Callable[[], None] | None:
    """The hook ``use_pacer`` installed (None: none)."""
    return _pace


def chunks(start: int, stop: int, step: int = CHUNK) -> Iterator[int]:
    """range(start, stop, step), pausing through ``use_pacer``'s hook between two steps."""
    for c in range(start, stop, step):
        if c != start:
            pace = _pace
            if pace is not None:
                pace()
        yield c


def all_pairs(op: Any, seq: Any) -> bool:
    """True when op(seq[i], seq[i + 1]) holds for every i."""
    n = len(seq)
    for c in chunks(0, max(n - 1, 0)):
        part = seq[c:c + CHUNK + 1]
        if not all(map(op, part, islice(part, 1, None))):
            return False
    return True


def any_zip(op: Any, a: Any, b: Any) -> bool:
    """True when op(a[i], b[i]) holds for some i."""
    return any(any(map(op, a[c:c + CHUNK], b[c:c + CHUNK])) for c in chunks(0, len(a)))


# The results below are made at their final size and filled a chunk at a time: grown
# by extend, an array of a million entries (over-allocated by a sixteenth) is copied
# whole again and again, each copy of up to 8 MB one long hold of the lock.


def mapped(typecode: str, fn: Any, seq: Any) -> array:
    """array(typecode, map(fn, seq)), in chunks."""
    n = len(seq)
    out = array(typecode, [0]) * n
    for c in chunks(0, n):
        out[c:c + CHUNK] = array(typecode, map(fn, seq[c:c + CHUNK]))
    return out


def byte_slices(blob: Any, off: Any, n: int) -> list[bytes]:
    """The n byte strings blob[off[i]:off[i + 1]], a chunk at a time (the blob itself
    is never copied whole)."""
    mv = raw(blob)
    out: list = [None] * n
    for c in chunks(0, n):
        part = off[c:c + CHUNK + 1]
        base = part[0]
        piece = bytes(mv[base:part[-1]])
        rel = _shifted(part, -base) if base else part
        out[c:c + CHUNK] = map(piece.__getitem__, map(slice, rel, islice(rel, 1, None)))
    return out


def text_slices(blob: Any, off: Any, n: int) -> list[str]:
    """The n strings blob[off[i]:off[i + 1]] (UTF-8 bytes; an invalid sequence reads
    as U+FFFD), decoded a chunk of strings at a time: no pass over the whole blob
    (ten MB for a million cards) holds the interpreter lock, and byte offsets
    stay right for text that is not ASCII."""
    mv = raw(blob)
    out: list = [None] * n
    for c in chunks(0, n):
        part = off[c:c + CHUNK + 1]
        base = part[0]
        piece = bytes(mv[base:part[-1]])
        if piece.isascii():
            rel = _shifted(part, -base)
            out[c:c + CHUNK] = map(piece.decode("ascii").__getitem__, map(slice, rel, islice(rel, 1, None)))
        else:
            out[c:c + CHUNK] = [piece[a - base:b - base].decode("utf-8", "replace")
                                for a, b in zip(part, islice(part, 1, None))]
    return out


def _merge2(a: list, b: list) -> list:
    """Two sorted lists merged, a chunk at a time: each step sorts one chunk of one
    list with the part of the other that falls below its end."""
    out: list = []
    i = j = 0
    la, lb = len(a), len(b)
    while i < la and j < lb:
        ia, jb = min(i + CHUNK, la), min(j + CHUNK, lb)
        hi = min(a[ia - 1], b[jb - 1])
        i2, j2 = bisect_right(a, hi, i, ia), bisect_right(b, hi, j, jb)
        part = a[i:i2]
        part.extend(b[j:j2])
        part.sort()
        out.extend(part)
        i, j = i2, j2
    for rest, k in ((a, i), (b, j)):
        for c in chunks(k, len(rest)):
            out.extend(rest[c:c + CHUNK])
    return out


def _interner(values: list) -> Any:
    """index(value): the index of value in ``values``, appended the first time it is seen;
    None is -1 (no validity string). People share their group lists and validity strings."""
    index = {v: i for i, v in enumerate(values)}

    def intern(value: Any) -> int:
        if value is None:
            return -1
        i = index.get(value)
        if i is None:
            i = index[value] = len(values)
            values.append(value)
        return i

    return intern


def sorted_array(seq: Any) -> array:
    """array("Q", sorted(seq)). With the compiled fastpath, its sort_keys: copied and
    sorted without the interpreter lock. Otherwise a chunk at a time: chunks sorted,
    then merged two by two (no single call runs over the whole column)."""
    if fastpath.IMPLEMENTATION == "compiled":
        try:
            return fastpath.sort_keys(seq)  # an array or a memoryview of unsigned 64-bit keys
        except (TypeError, ValueError):  # another buffer format, or a list: copied first
            return fastpath.sort_keys(array("Q", seq))
    runs = [sorted(seq[c:c + CHUNK]) for c in chunks(0, len(seq))]
    while len(runs) > 1:
        merged = [_merge2(runs[i], runs[i + 1]) for i in range(0, len(runs) - 1, 2)]
        if len(runs) % 2:
            merged.append(runs[-1])
        runs = merged
    out = array("Q")
    for c in chunks(0, len(runs[0]) if runs else 0):
        out.extend(runs[0][c:c + CHUNK])
    release(runs[0] if runs else [])
    return out


def release(items: list) -> None:
    """Empty a long list of objects a chunk at a time (freeing a million ints at once
    is one long pause)."""
    while items:
        del items[-CHUNK:]


def _empty(typecode: str) -> array:
    return array(typecode)


def _shifted(seg: Any, d: int) -> array:
    """The uint64 offsets `seg` plus d, as a new array. Offsets stay below 2**32 and
    every value is at least -d, so one big-integer addition over the 8-byte lanes
    never carries or borrows from one lane into the next."""
    out = array("Q")
    out.frombytes(raw(seg))
    n = len(out)
    if d == 0 or n == 0:
        return out
    if n < _SMALL_RUN:
        return array("Q", [x + d for x in out])
    big = int.from_bytes(out, "little")
    lanes = int.from_bytes(abs(d).to_bytes(8, "little") * n, "little")
    big = big + lanes if d > 0 else big - lanes
    return array("Q", big.to_bytes(8 * n, "little"))


_STEP_BYTES = 1 << 20  # a copy runs a MB at a time: the gate thread may take the lock between


def _heap_buffer(size: int) -> Any:
    return bytearray(size)


_big_buffer: Any = _heap_buffer


def use_buffers(make: Any) -> None:
    """Where columns of a MB and more live: ``make(size)`` returns a writable,
    zeroed buffer. The downlink gives anonymous mappings whose pages the kernel
    faults in with the lock released (agent/downlink/aclfiles.py); the core itself maps
    nothing (no I/O here), a bytearray by default."""
    global _big_buffer
    _big_buffer = make


def zeros(typecode: str, n: int) -> Any:
    """A writable column of n zeros: an array (bytes: a bytearray) when small; else a
    memoryview of a buffer from ``use_buffers``."""
    size = array(typecode).itemsize * n
    if size < _STEP_BYTES:
        return bytearray(size) if typecode == "B" else array(typecode, bytes(size))
    return memoryview(_big_buffer(size)).cast(typecode)


def copy_into(dst: memoryview, d0: int, src: Any, s0: int, n: int) -> None:
    """dst[d0:d0 + n] = src[s0:s0 + n] (same item size), a MB at a time."""
    if n <= 0:
        return
    src = src if isinstance(src, memoryview) else memoryview(src)
    step = max(1, _STEP_BYTES // dst.itemsize)
    for c in chunks(0, n, step):
        e = min(n, c + step)
        dst[d0 + c:d0 + e] = src[s0 + c:s0 + e]


def shift_into(dst: memoryview, d0: int, src: Any, s0: int, n: int, d: int) -> None:
    """dst[d0:d0 + n] = offsets src[s0:s0 + n] plus d, a piece at a time."""
    if d == 0:
        copy_into(dst, d0, src, s0, n)
        return
    for c in chunks(0, n):
        e = min(n, c + CHUNK)
        dst[d0 + c:d0 + e] = _shifted(src[s0 + c:s0 + e], d)


class PeopleColumns:
    """The people of a list, sorted by id, as columns (see the module docstring).

    Immutable by convention: ``merge`` and ``retimed`` return new ones. Columns
    are arrays, or memoryviews of a mapped file image."""

    __slots__ = (
        "card_keys",
        "card_off",
        "group_lists",
        "groups",
        "id_blob",
        "id_off",
        "p_from",
        "p_until",
        "room",
        "sorted_keys",
        "text_blob",
        "text_off",
        "texts",
        "vf",
        "vu",
    )

    def __init__(self, **cols: Any) -> None:
        for name, typecode in _COLUMNS:
            setattr(self, name, cols.get(name, _empty(typecode)))
        # Column name -> the whole buffer a column is the start of, when merge left
        # room after it (for the guests: AccessList.columns writes them there).
        self.room: dict[str, Any] = cols.get("room") or {}
        self.group_lists: list[tuple[str, ...]] = list(cols.get("group_lists", ()))
        self.texts: list[str] = list(cols.get("texts", ()))
        if not len(self.id_off):
            self.id_off = array("Q", [0])
        if not len(self.card_off):
            self.card_off = array("Q", [0])
        if not len(self.text_off):
            self.text_off = array("Q", [0])

    # -- building

    @classmethod
    def build(cls, people: Iterable[tuple], start: Any, end: Any) -> PeopleColumns:
        """From people tuples (id, cards, keys, groups, valid_from, valid_until), any
        order; `start`/`end` turn validity strings into epoch seconds."""
        people = sorted(people, key=operator.itemgetter(0))
        group_lists: list[tuple[str, ...]] = []
        texts: list[str] = []
        gidx, tidx = _interner(group_lists), _interner(texts)

        ids = [p[0].encode("utf-8") for p in people]
        card_texts = [c.encode("utf-8") for p in people for c in p[1]]
        vf = array("i", [tidx(p[4]) for p in people])
        vu = array("i", [tidx(p[5]) for p in people])
        from_tab = [start(t) for t in texts] + [NO_START]  # index -1: none
        until_tab = [end(t) for t in texts] + [NO_END]
        card_keys = array("Q", chain.from_iterable(p[2] for p in people))
        return cls(
            id_blob=b"".join(ids),
            id_off=array("Q", accumulate(map(len, ids), initial=0)),
            card_off=array("Q", accumulate((len(p[2]) for p in people), initial=0)),
            card_keys=card_keys,
            text_blob=b"".join(card_texts),
            text_off=array("Q", accumulate(map(len, card_texts), initial=0)),
            groups=array("i", [gidx(p[3]) for p in people]),
            vf=vf,
            vu=vu,
            p_from=mapped("q", from_tab.__getitem__, vf),
            p_until=mapped("q", until_tab.__getitem__, vu),
            sorted_keys=sorted_array(card_keys),
            group_lists=group_lists,
            texts=texts,
        )

    def retimed(self, start: Any, end: Any) -> PeopleColumns:
        """The same people with epochs recomputed (the list's time zone changed)."""
        from_tab = [start(t) for t in self.texts] + [NO_START]
        until_tab = [end(t) for t in self.texts] + [NO_END]
        new = self._copy()
        new.p_from = mapped("q", from_tab.__getitem__, self.vf)
        new.p_until = mapped("q", until_tab.__getitem__, self.vu)
        return new

    def _copy(self) -> PeopleColumns:
        new = PeopleColumns.__new__(PeopleColumns)
        for name in self.__slots__:
            setattr(new, name, getattr(self, name))
        new.room = {}  # retimed columns are new ones
        return new

    def grown(self, name: str, head: Any, tail: list) -> Any | None:
        """Column `name` (whose values are `head`, this object's own column) with the
        values `tail` after it, written in the room merge left; None when no room."""
        whole = self.room.get(name)
        n = len(head)
        if whole is None or head is not getattr(self, name) or len(whole) < n + len(tail):
            return None
        for j, v in enumerate(tail):
            whole[n + j] = v
        return whole[:n + len(tail)]

    # -- reading

    @property
    def n(self) -> int:
        return len(self.id_off) - 1

    @property
    def m(self) -> int:
        return len(self.card_keys)

    def id_at(self, i: int) -> str:
        return bytes(self.id_blob[self.id_off[i]:self.id_off[i + 1]]).decode("utf-8")

    def find(self, pid: str) -> int:
        """The index of the person with id `pid`, or -1."""
        lo = self.insertion_point(pid)
        off = self.id_off
        if lo < self.n and bytes(self.id_blob[off[lo]:off[lo + 1]]) == pid.encode("utf-8"):
            return lo
        return -1

    def insertion_point(self, pid: str) -> int:
        target = pid.encode("utf-8")
        blob, off = self.id_blob, self.id_off
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) >> 1
            if bytes(blob[off[mid]:off[mid + 1]]) < target:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def person(self, i: int) -> tuple:
        """Person i as a tuple (id, cards, keys, groups, valid_from, valid_until)."""
        a, b = self.card_off[i], self.card_off[i + 1]
        to = self.text_off
        cards = tuple(bytes(self.text_blob[to[j]:to[j + 1]]).decode("utf-8") for j in range(a, b))
        keys = tuple(self.card_keys[j] for j in range(a, b))
        vf, vu = self.vf[i], self.vu[i]
        return (
            self.id_at(i),
            cards,
            keys,
            self.group_lists[self.groups[i]],
            None if vf < 0 else self.texts[vf],
            None if vu < 0 else self.texts[vu],
        )

    def people(self) -> Iterator[tuple]:
        """Every person as a tuple, in id order (each one made as it is read)."""
        ids = bytes(self.id_blob).decode("utf-8")
        texts = bytes(self.text_blob).decode("utf-8")
        ascii_ids, ascii_texts = ids.isascii(), texts.isascii()
        io, co, to = self.id_off, self.card_off, self.text_off
        keys, groups, gl = self.card_keys, self.groups, self.group_lists
        vfs, vus, tx = self.vf, self.vu, self.texts
        for i in range(self.n):
            pid = ids[io[i]:io[i + 1]] if ascii_ids else self.id_at(i)
            a, b = co[i], co[i + 1]
            if ascii_texts:
                cards = tuple(texts[to[j]:to[j + 1]] for j in range(a, b))
            else:
                cards = tuple(
                    bytes(self.text_blob[to[j]:to[j + 1]]).decode("utf-8") for j in range(a, b)
                )
            vf, vu = vfs[i], vus[i]
            yield (
                pid,
                cards,
                tuple(keys[a:b]),
                gl[groups[i]],
                None if vf < 0 else tx[vf],
                None if vu < 0 else tx[vu],
            )

    def holds_key(self, key: int) -> bool:
        sk = self.sorted_keys
        i = bisect_left(sk, key)
        return i < len(sk) and sk[i] == key

    def holder_of(self, key: int) -> tuple[int, int]:
        """(person index, card index within the person) of a held key; (-1, -1) if none.
        A byte search: for error messages, not the hot path."""
        raw = bytes(self.card_keys) if not isinstance(self.card_keys, array) else self.card_keys.tobytes()
        pat = key.to_bytes(8, "little")
        pos = raw.find(pat)
        while pos >= 0 and pos % 8:
            pos = raw.find(pat, pos + 1)
        if pos < 0:
            return -1, -1
        j = pos // 8
        i = bisect_right(self.card_off, j) - 1
        return i, j - self.card_off[i]

    # -- changing

    def merge(self, drop: Iterable[int], add: Iterable[tuple], start: Any, end: Any, *,
              placed: list | None = None, spare: tuple[int, int] = (0, 0)) -> PeopleColumns:
        """A new PeopleColumns: the people at positions `drop` removed, the people
        tuples `add` put in at their place in id order (an id in both replaces).
        `placed` (a list) gets the new position of each added person; `spare`:
        (entries, id bytes) of room left after the columns a table needs (``room``).

        Two passes: the first plans runs of kept people and sizes every column,
        the second fills columns allocated once at their final size (memcpy per
        run, offsets shifted by one big-integer addition per run)."""
        drop = sorted(set(drop))
        add = sorted(add, key=operator.itemgetter(0))
        group_lists, texts = list(self.group_lists), list(self.texts)
        gidx, tidx = _interner(group_lists), _interner(texts)

        # Events in base order: an added person goes before the base person at its
        # insertion point; a dropped one is skipped.
        events = [(self.insertion_point(p[0]), 0, k) for k, p in enumerate(add)]
        events += [(i, 1, 0) for i in drop]
        events.sort()
        plan: list[tuple] = []  # ("run", a, b) or ("put", id bytes, card bytes, person)
        cursor = 0
        for pos, what, k in events:
            if pos > cursor:
                plan.append(("run", cursor, pos))
            if what == 0:
                p = add[k]
                plan.append(("put", p[0].encode("utf-8"), [c.encode("utf-8") for c in p[1]], p))
                cursor = max(cursor, pos)
            else:
                cursor = pos + 1
        if cursor < self.n:
            plan.append(("run", cursor, self.n))

        io, co, to = self.id_off, self.card_off, self.text_off
        n_out = m_out = id_len = text_len = 0
        for step in plan:
            if step[0] == "run":
                a, b = step[1], step[2]
                n_out += b - a
                m_out += co[b] - co[a]
                id_len += io[b] - io[a]
                text_len += to[co[b]] - to[co[a]]
            else:
                n_out += 1
                m_out += len(step[3][2])
                id_len += len(step[1])
                text_len += sum(map(len, step[2]))

        room: dict[str, Any] = {}
        extra, extra_bytes = spare

        def roomy(name: str, tc: str, n: int, more: int) -> Any:
            if not more:
                return zeros(tc, n)
            whole = zeros(tc, n + more)
            room[name] = whole if isinstance(whole, memoryview) else memoryview(whole)
            return room[name][:n]

        id_blob = roomy("id_blob", "B", id_len, extra_bytes)
        text_blob = zeros("B", text_len)
        id_off = roomy("id_off", "Q", n_out + 1, extra)
        card_off = roomy("card_off", "Q", n_out + 1, extra)
        text_off = zeros("Q", m_out + 1)
        card_keys = roomy("card_keys", "Q", m_out, extra)
        per = {name: roomy(name, tc, n_out, extra if name in ("groups", "p_from", "p_until") else 0)
               for name, tc in _COLUMNS if name in ("groups", "vf", "vu", "p_from", "p_until")}
        mv = {name: memoryview(col) for name, col in per.items()}
        mv_io, mv_co, mv_to = memoryview(id_off), memoryview(card_off), memoryview(text_off)
        mv_keys = memoryview(card_keys)
        src = {name: memoryview(getattr(self, name)) for name in per}
        src_keys = memoryview(self.card_keys)
        src_ids, src_texts = raw(self.id_blob), raw(self.text_blob)
        mv_ids, mv_texts = raw(id_blob), raw(text_blob)
        np_ = nc = ni = nt = 0  # filled so far: people, cards, id bytes, text bytes
        for step in plan:
            if step[0] == "run":
                a, b = step[1], step[2]
                ca, cb = co[a], co[b]
                ia, ib, ta, tb = io[a], io[b], to[ca], to[cb]
                k, kc = b - a, cb - ca
                copy_into(mv_ids, ni, src_ids, ia, ib - ia)
                copy_into(mv_texts, nt, src_texts, ta, tb - ta)
                shift_into(mv_io, np_ + 1, io, a + 1, k, ni - ia)
                shift_into(mv_co, np_ + 1, co, a + 1, k, nc - ca)
                shift_into(mv_to, nc + 1, to, ca + 1, kc, nt - ta)
                copy_into(mv_keys, nc, src_keys, ca, kc)
                for name, out in mv.items():
                    copy_into(out, np_, src[name], a, k)
                np_, nc, ni, nt = np_ + k, nc + kc, ni + ib - ia, nt + tb - ta
            else:
                _, rid, rcards, (_, _, keys, groups, vf, vu) = step
                id_blob[ni:ni + len(rid)] = rid
                ni += len(rid)
                for rc in rcards:
                    text_blob[nt:nt + len(rc)] = rc
                    nt += len(rc)
                    text_off[nc + 1] = nt
                    nc += 1
                if keys:
                    mv_keys[nc - len(keys):nc] = array("Q", keys)
                id_off[np_ + 1] = ni
                card_off[np_ + 1] = nc
                per["groups"][np_] = gidx(groups)
                per["vf"][np_] = tidx(vf)
                per["vu"][np_] = tidx(vu)
                per["p_from"][np_] = NO_START if vf is None else start(vf)
                per["p_until"][np_] = NO_END if vu is None else end(vu)
                if placed is not None:
                    placed.append(np_)
                np_ += 1

        # Sorted keys: the dropped people's keys out, the added people's in.
        gone = sorted(chain.from_iterable(self.card_keys[co[i]:co[i + 1]] for i in drop))
        new_keys = sorted(chain.from_iterable(p[2] for p in add))
        sk = self.sorted_keys
        kev = [(bisect_left(sk, key), 1, key) for key in gone]
        kev += [(bisect_left(sk, key), 0, key) for key in new_keys]
        kev.sort()
        sorted_keys = zeros("Q", len(sk) - len(gone) + len(new_keys))
        out_sk, src_sk = memoryview(sorted_keys), memoryview(sk)
        cur = filled = 0
        for pos, what, key in kev:
            if pos > cur:
                copy_into(out_sk, filled, src_sk, cur, pos - cur)
                filled += pos - cur
                cur = pos
            if what == 0:
                sorted_keys[filled] = key
                filled += 1
            else:
                cur = pos + 1
        if cur < len(sk):
            copy_into(out_sk, filled, src_sk, cur, len(sk) - cur)

        return PeopleColumns(
            id_blob=id_blob,
            id_off=id_off,
            card_off=card_off,
            card_keys=card_keys,
            text_blob=text_blob,
            text_off=text_off,
            sorted_keys=sorted_keys,
            group_lists=group_lists,
            texts=texts,
            room=room,
            **per,
        )

    # -- image

    def columns_for_image(self, wire: bool) -> list[tuple[str, str, Any]]:
        return [
            (name, tc, getattr(self, name))
            for name, tc in _COLUMNS
            if not (wire and name in DERIVED)
        ]


# --------------------------------------------------------------------------- image


def _pad(n: int) -> bytes:
    return bytes(-n % _ALIGN)


def crc32(data: Any, crc: int = 0) -> int:
    """CRC-32 (zlib's) of `data`, a MB at a time: the interpreter's lock can pass
    between two pieces (an image is checked beside a gate thread at a swap)."""
    mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
    step = 1 << 20
    for c in chunks(0, len(mv), step):
        crc = binascii.crc32(mv[c:c + step], crc)
    return crc


def encode(header: dict, people: PeopleColumns, *, wire: bool = False) -> list[Any]:
    """The image as a list of byte chunks (written one by one: no 60 MB join).

    `header`: the list without its people (JSON); the column table and the
    people's shared group lists and validity strings are added here."""
    cols = people.columns_for_image(wire)
    table = []
    offset = 0
    for name, tc, col in cols:
        nbytes = len(col) * array(tc).itemsize
        table.append([name, tc, len(col), offset])
        offset += nbytes + (-nbytes % _ALIGN)
    head = dict(header)
    head["group_lists"] = [list(t) for t in people.group_lists]
    head["texts"] = people.texts
    head["columns"] = table
    hb = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hb += _pad(len(hb))
    chunks: list[Any] = [hb]
    for _name, tc, col in cols:
        mv = memoryview(col).cast("B") if not isinstance(col, (bytes, bytearray)) else col
        chunks.append(mv)
        if len(mv) % _ALIGN:
            chunks.append(_pad(len(mv)))
    crc = 0
    body_len = 0
    for c in chunks:
        crc = crc32(c, crc)
        body_len += len(c)
    prefix = _PREFIX.pack(IMAGE_MAGIC, IMAGE_FORMAT, len(hb), body_len, crc)
    return [prefix, *chunks]


def decode(buf: Any, *, check_crc: bool = True) -> tuple[dict, dict[str, memoryview]]:
    """(header, columns as memoryviews into `buf`) of an image; ImageError saying
    what is wrong with a short, torn or altered one. The columns' contents are
    not checked here (a trusted file was checked before it was written; a
    received image is checked by agent.core.acl)."""
    mv = memoryview(buf).cast("B")
    if len(mv) < _PREFIX.size:
        raise ImageError(f"{len(mv)} bytes: too short for an access-list image")
    magic, fmt, head_len, body_len, crc = _PREFIX.unpack_from(mv, 0)
    if magic != IMAGE_MAGIC:
        raise ImageError("not an access-list image (wrong magic)")
    if fmt != IMAGE_FORMAT:
        raise ImageError(f"image format {fmt}; this gate reads format {IMAGE_FORMAT}")
    body = mv[_PREFIX.size:]
    if len(body) != body_len:
        raise ImageError(f"truncated or padded: the body has {len(body)} bytes, the header says "
                         f"{body_len}")
    if head_len > body_len or head_len % _ALIGN:
        raise ImageError(f"header length {head_len} does not fit the body")
    if check_crc and crc32(body) != crc:
        raise ImageError("checksum mismatch: the image was altered or torn")
    try:
        header = json.loads(bytes(body[:head_len]).rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not isinstance(header.get("columns"), list):
        raise ImageError("header has no column table")
    data = body[head_len:]
    known = dict(_COLUMNS)
    cols: dict[str, memoryview] = {}
    for entry in header["columns"]:
        if not (isinstance(entry, list) and len(entry) == 4):
            raise ImageError(f"bad column entry {str(entry)[:80]}")
        name, tc, count, offset = entry
        if known.get(name) != tc or not isinstance(count, int) or not isinstance(offset, int):
            raise ImageError(f"bad column entry {str(entry)[:80]}")
        size = array(tc).itemsize
        if count < 0 or offset < 0 or offset % _ALIGN or offset + count * size > len(data):
            raise ImageError(f"column {name} ({count} entries at {offset}) runs past the image")
        cols[name] = data[offset:offset + count * size].cast(tc) if tc != "B" else data[
            offset:offset + count]
    return header, cols


def people_from_image(header: dict, cols: dict[str, memoryview]) -> PeopleColumns:
    """PeopleColumns over decoded columns (missing derived ones stay empty)."""
    gl = header.get("group_lists")
    tx = header.get("texts")
    if not isinstance(gl, list) or not isinstance(tx, list):
        raise ImageError("header lacks group_lists or texts")
    try:
        group_lists = [tuple(x) for x in gl]
    except TypeError:
        raise ImageError("group_lists must be lists of group names") from None
    return PeopleColumns(group_lists=group_lists, texts=tx, **cols)


def shift_check(values: Any) -> bool:
    """True when `values` never decreases (offsets)."""
    return all_pairs(operator.le, values)


# --------------------------------------------------------------------------- delta log

# The deltas applied since the image was written, kept beside it (docs/access-list.md,
# "How a gate holds the list"): one record per delta, appended and fsynced before the
# delta is acknowledged. A record: magic, payload length, sequence number, CRC-32 of
# the sequence number and the payload; the payload is the delta's JSON with when it
# was applied.
LOG_MAGIC = b"GDLT"
_RECORD = struct.Struct("<4sIQI4x")
MAX_RECORD = 64 << 20  # a delta bigger than this is sent as a snapshot anyway


def encode_record(seq: int, payload: dict) -> bytes:
    """One log record (bytes) holding `payload` (JSON) under sequence number `seq`."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(body) > MAX_RECORD:
        raise ValueError(f"a delta of {len(body)} bytes is too big for the log")
    crc = binascii.crc32(body, binascii.crc32(seq.to_bytes(8, "little")))
    return _RECORD.pack(LOG_MAGIC, len(body), seq, crc) + body


def read_records(buf: Any) -> tuple[list[tuple[int, dict]], int, str | None, str | None]:
    """(records, good_length, torn, damage) of a log's bytes.

    ``records``: (seq, payload) of every whole record before any damage;
    ``good_length``: the bytes they take. A last record cut short or failing
    its checksum at the end of the file is a write a crash tore (never
    acknowledged): ``torn`` says so and it is left out. A bad record followed
    by more bytes is damage: ``damage`` says what, and the records before it
    are all that can be trusted."""
    mv = memoryview(buf).cast("B")
    out: list[tuple[int, dict]] = []
    pos, end = 0, len(mv)
    while pos < end:
        if end - pos < _RECORD.size:
            return out, pos, f"{end - pos} bytes at {pos}: a record header cut short", None
        magic, length, seq, crc = _RECORD.unpack_from(mv, pos)
        if magic != LOG_MAGIC or length > MAX_RECORD:
            return out, pos, None, f"no record at byte {pos} (wrong magic or length)"
        stop = pos + _RECORD.size + length
        if stop > end:
            cut = f"the record at byte {pos} is cut short ({end - pos} of {stop - pos} bytes)"
            return out, pos, cut, None
        body = mv[pos + _RECORD.size:stop]
        if binascii.crc32(body, binascii.crc32(seq.to_bytes(8, "little"))) != crc:
            what = f"the record at byte {pos} (seq {seq}) fails its checksum"
            if stop == end:
                return out, pos, what, None
            return out, pos, None, what
        try:
            payload = json.loads(bytes(body).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return out, pos, None, f"the record at byte {pos} (seq {seq}) is not JSON"
        if not isinstance(payload, dict):
            return out, pos, None, f"the record at byte {pos} (seq {seq}) is not an object"
        out.append((seq, payload))
        pos = stop
    return out, pos, None, None
