"""Rows read straight from an SQLite file's pages, for salvaging a damaged journal.

SQLite's own recovery (the ``.recover`` command of the ``sqlite3`` shell, the
recovery extension) needs the ``sqlite_dbpage`` virtual table, which Debian's
and Raspberry Pi OS's ``libsqlite3`` are built without: there ``.recover``
stops with "SQL logic error" even on a sound file, and Python's ``sqlite3``
module has no recovery API. So the journal reads its rows the way that
extension does, from the file format itself (https://www.sqlite.org/fileformat2.html):
every page that is a table b-tree leaf is decoded on its own, whatever
became of the pages that point to it. A truncated file, a garbled page 1 (the
schema and the header) or a damaged interior page therefore costs only the
rows on the pages that are gone.

The write-ahead log is read too: for each page the newest frame of a
committed transaction (frames of the log's current generation, up to its last
commit frame) replaces the page in the main file, so records committed since
the last checkpoint are found as well. Frame checksums are not verified: a row
is only taken when its own content checks out (the journal compares each
record's body with its rowid), which a torn or stale page cannot fake.

Pages no longer in use (the freelist) keep old rows; they are read as well and
marked, so the caller can prefer a row from a page in use. What this module
cannot tell apart is kept for the caller to decide: it yields every cell it
can decode, never guesses.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

__all__ = ["Cell", "PageReader"]

_MAGIC = b"SQLite format 3\x00"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_LEAF_TABLE = 0x0D
_PAGE_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512)
_SNIFF_PAGES = 64  # pages tried per candidate size when the header is unreadable


@dataclass(frozen=True)
class Cell:
    """One row of a table b-tree leaf: its rowid and column values; ``free``
    when its page is on the file's freelist (an old copy)."""

    page: int
    rowid: int
    values: tuple
    free: bool = False


def _varint(buf: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``at``: (value, offset after it)."""
    value = 0
    for i in range(8):
        b = buf[at + i]
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, at + i + 1
    value = (value << 8) | buf[at + 8]
    if value >= 1 << 63:
        value -= 1 << 64
    return value, at + 9


def _value(serial: int, buf: bytes, at: int) -> tuple[object, int]:
    if serial == 0:
        return None, at
    if 1 <= serial <= 6:
        n = (1, 2, 3, 4, 6, 8)[serial - 1]
        raw = buf[at : at + n]
        if len(raw) != n:
            raise ValueError("record cut short")
        return int.from_bytes(raw, "big", signed=True), at + n
    if serial == 7:
        raw = buf[at : at + 8]
        if len(raw) != 8:
            raise ValueError("record cut short")
        return struct.unpack(">d", raw)[0], at + 8
    if serial in (8, 9):
        return serial - 8, at
    if serial >= 12:
        n = (serial - 12) // 2
        raw = buf[at : at + n]
        if len(raw) != n:
            raise ValueError("record cut short")
        if serial % 2:
            return raw.decode("utf-8", "strict"), at + n
        return bytes(raw), at + n
    raise ValueError(f"reserved serial type {serial}")


def _record(payload: bytes) -> tuple:
    header_len, at = _varint(payload, 0)
    if not 1 <= header_len <= len(payload):
        raise ValueError("bad record header")
    serials = []
    while at < header_len:
        s, at = _varint(payload, at)
        serials.append(s)
    if at != header_len:
        raise ValueError("bad record header")
    values = []
    at = header_len
    for s in serials:
        v, at = _value(s, payload, at)
        values.append(v)
    if at != len(payload):
        raise ValueError("record length does not match its header")
    return tuple(values)


class PageReader:
    """The pages of one SQLite database: the main file, overlaid with the
    committed frames of its write-ahead log (either may be missing).

    ``cells()`` reads the pages as SQLite would see them now; ``old_cells()``
    the versions they replaced (a main-file page the log holds a newer copy
    of, older frames of a page, frames of the log's earlier generations),
    which matter only when the newer version is gone (the database file
    deleted with its log left, say)."""

    def __init__(self, db: Path | None, wal: Path | None = None) -> None:
        self._db = open(db, "rb") if db is not None and Path(db).exists() else None  # noqa: SIM115
        self._db_size = os.fstat(self._db.fileno()).st_size if self._db is not None else 0
        self._wal = open(wal, "rb") if wal is not None and Path(wal).exists() else None  # noqa: SIM115
        self.header_ok = False
        self.page_size = 0
        self.reserved = 0
        self.freelist: set[int] = set()
        self._frames: dict[int, int] = {}  # page number -> offset of its newest committed frame
        self._old_frames: list[tuple[int, int]] = []  # (page number, offset): replaced versions
        self._wal_salts = b""
        head = self._read_db(0, 100)
        wal_size = self._read_wal_header()
        if len(head) == 100 and head[:16] == _MAGIC:
            size = int.from_bytes(head[16:18], "big")
            size = 65536 if size == 1 else size
            if size in _PAGE_SIZES and head[20] < size // 2:
                self.header_ok = True
                self.page_size, self.reserved = size, head[20]
        if not self.header_ok:
            self.page_size = wal_size or self._sniff_page_size()
        self._index_wal(wal_size)
        if self.header_ok:
            self._read_freelist(head)

    # -- files -------------------------------------------------------------------

    def _read_db(self, offset: int, n: int) -> bytes:
        if self._db is None or offset >= self._db_size:
            return b""
        return os.pread(self._db.fileno(), n, offset)

    def _read_wal_header(self) -> int:
        if self._wal is None:
            return 0
        head = os.pread(self._wal.fileno(), 32, 0)
        if len(head) != 32:
            return 0
        magic, _version, size = struct.unpack(">III", head[:12])
        if magic not in _WAL_MAGICS or size not in _PAGE_SIZES:
            return 0
        self._wal_salts = head[16:24]
        return size

    def _index_wal(self, wal_size: int) -> None:
        if not wal_size or wal_size != self.page_size:
            return
        fd = self._wal.fileno()
        frame = 24 + wal_size
        offset = 32
        current = True  # frames of the log's current generation come first, from its start
        pending: list[tuple[int, int]] = []
        while True:
            head = os.pread(fd, 24, offset)
            if len(head) != 24 or len(os.pread(fd, 1, offset + frame - 1)) != 1:
                break
            pgno, commit = struct.unpack(">II", head[:8])
            if current and head[8:16] != self._wal_salts:
                current = False  # the rest was written before the log restarted
                pending.clear()  # a transaction never committed: its frames never counted
            if not current:
                if 0 < pgno < 1 << 31:
                    self._old_frames.append((pgno, offset + 24))
            elif pgno:
                pending.append((pgno, offset + 24))
                if commit:  # a committed transaction: its frames are the pages now
                    for no, at in pending:
                        if no in self._frames:
                            self._old_frames.append((no, self._frames[no]))
                        self._frames[no] = at
                    pending.clear()
            offset += frame

    def _sniff_page_size(self) -> int:
        """The page size when the header is unreadable: the candidate under which
        the first bytes of the file decode into the most rows (a size too small
        cuts cells off, one too large skips the pages in between)."""
        window = max(_PAGE_SIZES) * 4
        best, best_rows = 4096, 0
        for size in _PAGE_SIZES:
            self.page_size = size
            rows = 0
            for pgno in range(2, window // size + 1):
                page = self._read_db((pgno - 1) * size, size)
                if len(page) == size:
                    rows += sum(1 for _ in self._page_cells(page, pgno, False, follow=False))
            if rows > best_rows:
                best, best_rows = size, rows
        return best

    def _read_freelist(self, head: bytes) -> None:
        """Pages the file itself lists as free: their rows are old copies."""
        trunk = int.from_bytes(head[32:36], "big")
        seen = 0
        limit = self.page_count()
        while trunk and seen <= limit:
            page = self.page(trunk)
            if len(page) < 8:
                return
            self.freelist.add(trunk)
            n = int.from_bytes(page[4:8], "big")
            if n > (self.page_size - 8) // 4:
                return
            for i in range(n):
                self.freelist.add(int.from_bytes(page[8 + 4 * i : 12 + 4 * i], "big"))
            seen += 1
            trunk = int.from_bytes(page[:4], "big")

    def page_count(self) -> int:
        in_file = -(-self._db_size // self.page_size) if self.page_size else 0
        return max([in_file, *self._frames])

    def page(self, pgno: int) -> bytes:
        """Page ``pgno`` (from 1) as it was last committed; b"" when not there."""
        at = self._frames.get(pgno)
        if at is not None:
            return os.pread(self._wal.fileno(), self.page_size, at)
        page = self._read_db((pgno - 1) * self.page_size, self.page_size)
        if 0 < len(page) < self.page_size:
            # The file was cut inside this page: the cells before the cut may be whole
            # (the zeros that stand in for the rest fail every check).
            page += bytes(self.page_size - len(page))
        return page

    def close(self) -> None:
        for f in (self._db, self._wal):
            if f is not None:
                f.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- b-tree leaves -------------------------------------------------------------

    def _leaf_cells(self, page: bytes, pgno: int) -> list[int] | None:
        """Cell offsets of a table leaf page, or None when it is not one."""
        base = 100 if pgno == 1 else 0
        if len(page) < base + 8 or page[base] != _LEAF_TABLE:
            return None
        n = int.from_bytes(page[base + 3 : base + 5], "big")
        usable = self.page_size - self.reserved
        end = base + 8 + 2 * n
        if n == 0 or end > usable:
            return None
        offsets = []
        for i in range(n):
            off = int.from_bytes(page[base + 8 + 2 * i : base + 10 + 2 * i], "big")
            if not end <= off < usable:
                return None
            offsets.append(off)
        return offsets

    def _payload(self, page: bytes, off: int, limit: int, follow: bool) -> tuple[int, bytes] | None:
        usable = self.page_size - self.reserved
        total, at = _varint(page, off)
        rowid, at = _varint(page, at)
        if total < 0 or total > 1 << 30:
            return None
        x = usable - 35
        if total <= x:
            local = total
        else:
            m = ((usable - 12) * 32 // 255) - 23
            k = m + ((total - m) % (usable - 4))
            local = k if k <= x else m
        if at + local > usable:
            return None
        data = bytearray(page[at : at + local])
        if local < total:
            if not follow:
                return None
            nxt = int.from_bytes(page[at + local : at + local + 4], "big")
            hops = 0
            while len(data) < total:
                if not 1 <= nxt <= limit or hops > limit:
                    return None
                over = self.page(nxt)
                if not over:
                    return None
                nxt = int.from_bytes(over[:4], "big")
                data += over[4 : 4 + min(usable - 4, total - len(data))]
                hops += 1
        return rowid, bytes(data)

    def _page_cells(self, page: bytes, pgno: int, free: bool, follow: bool = True) -> Iterator[Cell]:
        offsets = self._leaf_cells(page, pgno)
        if offsets is None:
            return
        limit = self.page_count()
        for off in offsets:
            try:
                got = self._payload(page, off, limit, follow)
                if got is None:
                    continue
                rowid, payload = got
                values = _record(payload)
            except (IndexError, ValueError, UnicodeDecodeError, struct.error):
                continue  # a damaged cell: the rest of the page may still be sound
            yield Cell(pgno, rowid, values, free)

    def cells(self) -> Iterator[Cell]:
        """Every table-leaf cell that decodes, page by page; ``free`` on the
        cells of pages the file lists as free."""
        for pgno in range(1, self.page_count() + 1):
            page = self.page(pgno)
            if page:
                yield from self._page_cells(page, pgno, pgno in self.freelist)

    def old_cells(self) -> Iterator[Cell]:
        """The cells of replaced versions of pages (all marked ``free``)."""
        in_file = -(-self._db_size // self.page_size) if self.page_size else 0
        for pgno in sorted(self._frames):
            if pgno <= in_file:
                page = self._read_db((pgno - 1) * self.page_size, self.page_size)
                page += bytes(self.page_size - len(page))
                yield from self._page_cells(page, pgno, True)
        for pgno, at in self._old_frames:
            page = os.pread(self._wal.fileno(), self.page_size, at)
            if len(page) == self.page_size:
                yield from self._page_cells(page, pgno, True)
