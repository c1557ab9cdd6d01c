"""The access list's files in the state directory, and the memory its columns live in.

``acl.bin`` (the applied list as the binary image of agent/core/aclstore.py,
written atomically), ``acl.deltas`` (the deltas applied since, one durable
record each), ``counters.json`` (the last signed counter accepted per key and
the time floor: ``CounterStore``), the legacy ``acl.json``, and moving a
damaged file aside. ``anonymous_pages`` gives the core's big columns private
anonymous mappings, faulted in with the interpreter lock released. The list's
handling itself (check, build, swap) is agent.downlink.acl_sync's.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent import host
from agent.core import aclstore
from agent.core.acl import AccessList
from agent.core.aclstore import IMAGE_MAGIC, ImageError, read_records
from agent.fileio import fsync_dir, write_atomic

__all__ = [
    "ACL_FILE",
    "COUNTERS_FILE",
    "DELTA_LOG",
    "FLOOR_SAVE_S",
    "LEGACY_ACL_FILE",
    "CounterStore",
    "anonymous_pages",
    "append_record",
    "ensure_state_dir",
    "move_aside",
    "read_stored",
    "read_stored_seq",
    "store_list",
    "stored_summary",
]

log = logging.getLogger("agent.downlink")

log = logging.getLogger("agent.downlink")

ACL_FILE = "acl.bin"  # the binary image (agent/core/aclstore.py)
DELTA_LOG = "acl.deltas"  # deltas applied since acl.bin was written (aclstore.encode_record)
LEGACY_ACL_FILE = "acl.json"  # what versions before the image kept; read once, then replaced
COUNTERS_FILE = "counters.json"
# acl.bin reaches the disk this much at a time (agent/fileio.py, write_atomic's sync_every).
STORE_SYNC_BYTES = 4 << 20
FLOOR_SAVE_S = 3600.0  # the moving floor is stored again once it has gained this much
_MAX_TEXT = 1000  # path and message lengths the record allows


# --------------------------------------------------------------------------- files


def ensure_state_dir(state_dir: Path) -> Path:
    """The state directory, created 0700 when missing (it holds personal data)."""
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create the state directory {state_dir}: {exc.strerror}; "
                      "create it for the service user (systemd StateDirectory=)") from None
    return state_dir


def _stamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, tz=UTC).strftime("%Y%m%dT%H%M%SZ")


def move_aside(path: Path, epoch_s: float) -> Path:
    """Rename a damaged file to ``<name>.corrupt-<UTC stamp>`` (kept for a technician)."""
    target = path.with_name(f"{path.name}.corrupt-{_stamp(epoch_s)}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{_stamp(epoch_s)}-{n}")
    os.replace(path, target)
    return target


def _move_aside_or_keep(path: Path, epoch_s: float) -> Path | str:
    """move_aside, or on a filesystem that refuses it (an SD card remounted
    read-only) leave the file where it is: the start must go on."""
    try:
        return move_aside(path, epoch_s)
    except OSError as exc:
        log.error("could not move %s aside (%s); it stays where it is", path, exc.strerror or exc)
        return f"nowhere ({path} could not be moved: {exc.strerror or exc})"


class CounterStore:
    """The last accepted counter per signing key, and the time floor, on disk
    (``counters.json``, 0600).

    Two counter spaces: ``cmd`` (commands) and ``acl`` (signed lists).
    ``advance`` is check-and-set under a lock and is durable before it
    returns, so a command is acted on only after its counter is on disk: a
    crash cannot make a replay acceptable.

    The time floor is the highest ``issued_at`` of a verified message: the
    server's clock says the time was at least that, so the gate never
    believes a time below it (docs/contract.md, "Time floor"). In memory it
    moves on with the monotonic clock (true time has moved on at least as
    much since); on disk it is written with the counters, and again by
    ``save_floor`` once it has moved on by ``FLOOR_SAVE_S``.

    A damaged file is moved aside and reported; counting starts again from
    zero and the floor from none (the expiry check still bounds replays then).
    """

    def __init__(self, path: Path, *, wall: Callable[[], float],
                 report: Callable[[str, dict], None],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._mono = monotonic
        self._data: dict[str, dict[str, int]] = {"cmd": {}, "acl": {}}
        self._floor: tuple[float, float] = (0.0, monotonic())  # (seconds, monotonic then)
        self._saved_floor = 0.0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            for space in ("cmd", "acl"):
                values = data.get(space, {})
                if not isinstance(values, dict) or not all(
                        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                        for k, v in values.items()):
                    raise TypeError(f"{space!r} is not a table of key_id -> integer")
                self._data[space] = dict(values)
            floor = data.get("floor", 0.0)
            if (not isinstance(floor, (int, float)) or isinstance(floor, bool)
                    or not 0 <= floor < 1e11):
                raise TypeError("'floor' is not a time in epoch seconds")
            self._floor = (float(floor), monotonic())
            self._saved_floor = float(floor)
        except (ValueError, TypeError) as exc:
            self._data = {"cmd": {}, "acl": {}}
            moved = _move_aside_or_keep(self.path, wall())
            log.error("replay counters in %s are damaged (%s); moved to %s, counting from zero",
                      self.path, exc, moved)
            report("alarm", {"kind": "counters_reset", "active": True,
                             "detail": f"replay counters were damaged ({str(exc)[:200]}) and moved "
                                       f"to {moved}; counting starts from zero and the time floor "
                                       "from none, the expiry check still bounds replays; check "
                                       "the disk"[:_MAX_TEXT]})

    def last(self, space: str, key_id: str) -> int:
        with self._lock:
            return self._data[space].get(key_id, 0)

    def floor(self) -> float:
        """The time floor now, epoch seconds: 0.0 while no verified message carried one."""
        seconds, since = self._floor  # one tuple: readable from any thread without the lock
        if seconds <= 0:
            return 0.0
        return seconds + max(0.0, self._mono() - since)

    def advance(self, space: str, key_id: str, counter: int, floor: float | None = None) -> bool:
        """True and stored (durably) when ``counter`` is above the last one; else False.
        ``floor``: a verified ``issued_at`` stored in the same write (see ``raise_floor``)."""
        with self._lock:
            if counter <= self._data[space].get(key_id, 0):
                return False
            new = {s: dict(v) for s, v in self._data.items()}
            new[space][key_id] = counter
            floor_at = self._raised(floor)
            self._write(new, floor_at)
            self._data = new
            self._floor = floor_at
            return True

    def raise_floor(self, floor: float | None) -> bool:
        """Raise the floor to ``floor`` (epoch seconds) if that is higher; True when raised.

        Kept in memory even when the disk refuses it (the server's word holds
        until a restart); the failure is logged and the next write retries."""
        with self._lock:
            floor_at = self._raised(floor)
            if floor_at is self._floor:
                return False
            self._floor = floor_at
            try:
                self._write(self._data, floor_at)
            except OSError as exc:
                log.error("could not store the time floor in %s (%s); it holds until a restart",
                          self.path, exc)
            return True

    def save_floor(self, min_gain_s: float = 0.0) -> None:
        """Store the floor if it has moved on by more than ``min_gain_s`` since last stored."""
        with self._lock:
            seconds, since = self._floor
            if seconds <= 0:
                return
            now_floor = seconds + max(0.0, self._mono() - since)
            if now_floor - self._saved_floor <= min_gain_s:
                return
            try:
                self._write(self._data, self._floor)
            except OSError as exc:
                log.warning("could not store the time floor in %s (%s)", self.path, exc)

    def _raised(self, floor: float | None) -> tuple[float, float]:
        """The floor pair after raising it to ``floor`` (the same object when not higher)."""
        if floor is None:
            return self._floor
        seconds, since = self._floor
        mono = self._mono()
        current = seconds + max(0.0, mono - since) if seconds > 0 else 0.0
        return (float(floor), mono) if floor > current else self._floor

    def _write(self, data: dict[str, dict[str, int]], floor_at: tuple[float, float]) -> None:
        seconds, since = floor_at
        floor = seconds + max(0.0, self._mono() - since) if seconds > 0 else 0.0
        doc: dict[str, Any] = {s: v for s, v in data.items()}
        doc["floor"] = round(floor, 3)
        write_atomic(self.path, json.dumps(doc, sort_keys=True).encode("utf-8"))
        self._saved_floor = floor





def store_list(path: Path, acl: AccessList, *, applied_at: float, kind: str = "snapshot",
               base: str | None = None, seq: int = 0) -> None:
    """Keep an applied list on disk (``acl.bin`` in the state directory, 0600, atomic):
    the binary image ``load_persisted`` maps at the next start. `seq`: the last
    change it holds (records of the delta log up to it are in it). OSError when
    it cannot be written."""
    stored = {"applied_at": applied_at, "kind": kind, "base": base, "seq": seq}
    write_atomic(path, acl.to_image(stored=stored), sync_every=STORE_SYNC_BYTES)


def append_record(path: Path, record: bytes) -> None:
    """Append one record to the delta log and fsync it (and the directory when the
    log is new): on disk before the delta is acknowledged. OSError when it cannot."""
    path = Path(path)
    new = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        view = memoryview(record)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)




def _stored_seq(stored: dict) -> int:
    seq = stored.get("seq", 0)
    return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0


def read_stored(path: Path) -> tuple[AccessList, float, Any]:
    """(list, applied_at, keep-alive) of a stored file: the binary image, mapped
    (the keep-alive is the mapping), or the JSON of older versions. ValueError
    (or TypeError, KeyError) saying what is wrong with a damaged one;
    FileNotFoundError when there is none."""
    acl, applied_at, mm, _ = read_stored_seq(path)
    return acl, applied_at, mm


def read_stored_seq(path: Path) -> tuple[AccessList, float, Any, int]:
    """read_stored and the sequence number of the last change the file holds."""
    with open(path, "rb") as f:
        head = f.read(len(IMAGE_MAGIC))
        if head != IMAGE_MAGIC:
            f.seek(0)
            data = json.loads(f.read())
            if not isinstance(data, dict) or data.get("format") != 1:
                raise TypeError("not an access-list file of format 1")
            applied_at = data.get("applied_at")
            if not isinstance(applied_at, (int, float)) or isinstance(applied_at, bool):
                raise TypeError("applied_at is missing")
            return AccessList.from_snapshot(data.get("list")), float(applied_at), None, 0
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    acl, stored = AccessList.from_image(mm, trusted=True)
    applied_at = stored.get("applied_at")
    if not isinstance(applied_at, (int, float)) or isinstance(applied_at, bool):
        raise ImageError("applied_at is missing")
    return acl, float(applied_at), mm, _stored_seq(stored)


def _release_pages(mm: Any) -> None:
    """Hand the mapped pages back: the table holds what the gate needs, and the
    list's columns are read again (from the page cache or the card) only by the
    next delta. Advice only."""
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except OSError:
            log.debug("madvise(MADV_DONTNEED) refused", exc_info=True)


def _libc() -> Any:
    """glibc (agent.host.libc) with the two calls made here typed, or None. A ctypes
    call hands the interpreter lock over for as long as it runs: the kernel's work
    it asks for (zeroing pages, trimming the heap) never keeps the gate thread
    waiting."""
    global _libc_typed
    lib = host.libc()
    if lib is not None and not _libc_typed:
        import ctypes

        try:
            lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            lib.madvise.restype = ctypes.c_int
            lib.malloc_trim.argtypes = (ctypes.c_size_t,)
        except AttributeError:
            return None
        _libc_typed = True
    return lib if _libc_typed else None


def _trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's malloc_trim): building
    a big table frees tens of MB of columns that glibc would otherwise keep. Advice;
    nothing elsewhere."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


_libc_typed = False
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14
_MB = 1 << 20


def anonymous_pages(size: int) -> mmap.mmap:
    """A zeroed, writable buffer for a big column (aclstore.use_buffers): a private
    anonymous mapping (a shared one is shmem: slower faults), handed back as soon
    as the column is freed. Its pages are faulted in at once by one madvise through
    ctypes, with the interpreter lock released (a merge then copies into memory
    that is there: faults inside its copies would hold the lock); where that cannot
    be done, a MB per call (the lock passes between two). Ordinary 4 KiB pages, not
    huge ones: the columns are copied and written once, never searched at random
    (the decision table is, and has its own), and a huge page asked for may make
    the kernel compact memory first (0.26 s for 54 MB measured here against 0.03 s
    for small pages, a 1,000-card delta's merge of a million-card list)."""
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    if size and not _populate(m, size):
        for c in range(0, size, _MB):
            try:
                m.madvise(_MADV_POPULATE_WRITE, c, min(_MB, size - c))
            except (OSError, ValueError, AttributeError):
                break  # an older kernel: pages come in as they are first written
    return m


def _populate(m: mmap.mmap, size: int) -> bool:
    """MADV_POPULATE_WRITE over the whole mapping, the lock released; False when not done."""
    lib = _libc()
    if lib is None:
        return False
    import ctypes

    view = ctypes.c_char.from_buffer(m)
    try:
        return lib.madvise(ctypes.addressof(view), size, _MADV_POPULATE_WRITE) == 0
    finally:
        del view  # the mapping may be closed only once nothing points into it


aclstore.use_buffers(anonymous_pages)


def stored_summary(state_dir: Path) -> tuple[Path, dict]:
    """(path, {"version", "applied_at", "people"}) of the list kept in `state_dir`,
    read without building it (for the doctor). FileNotFoundError when none;
    ValueError or OSError when it cannot be read."""
    state_dir = Path(state_dir)
    path = state_dir / ACL_FILE
    if not path.exists() and (state_dir / LEGACY_ACL_FILE).exists():
        path = state_dir / LEGACY_ACL_FILE
    with open(path, "rb") as f:
        raw = f.read()
    if raw.startswith(IMAGE_MAGIC):
        from agent.core import aclstore

        header, cols = aclstore.decode(raw)
        stored = header.get("stored") if isinstance(header.get("stored"), dict) else {}
        off = cols.get("id_off")
        out = {"version": header.get("version"), "applied_at": stored.get("applied_at"),
               "people": max(0, len(off) - 1) if off is not None else 0}
        # The deltas of the log after it (read as the start does, without applying them).
        try:
            records = read_records((state_dir / DELTA_LOG).read_bytes())[0]
        except OSError:
            records = []
        for seq, rec in records:
            delta = rec.get("delta")
            if seq > _stored_seq(stored) and isinstance(delta, dict):
                out["version"], out["applied_at"] = delta.get("version"), rec.get("applied_at")
        return path, out
    data = json.loads(raw)
    lst = data.get("list") if isinstance(data, dict) else None
    return path, {
        "version": lst.get("version") if isinstance(lst, dict) else None,
        "applied_at": data.get("applied_at") if isinstance(data, dict) else None,
        "people": len(lst.get("people", [])) if isinstance(lst, dict) else 0,
    }
