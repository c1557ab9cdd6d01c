"""Writing a file so that a crash or a power cut leaves the old one or the new one.

The one way the agent and its tools replace a file that matters (the state
file, the stored access list, the counters, a provisioned config and its
keys): a temporary file beside it (``.NAME.tmp-PID-THREAD``, so a start can
find and remove one a crash left), written and fsynced, given its mode (and,
when running as root, its owner) before it is renamed over the old one, then
the directory fsynced so the rename itself survives a power cut.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["LatestWriter", "fsync_dir", "set_aside", "temp_name", "write_atomic"]


def set_aside(path: Path) -> Path:
    """Rename a file that cannot be read to ``<name>.corrupt-<n>`` (the first n free), kept
    for a technician; the name it got, or would have got where the rename fails (logged:
    the caller starts afresh either way)."""
    n = 1
    while (aside := path.with_name(f"{path.name}.corrupt-{n}")).exists():
        n += 1
    try:
        os.replace(path, aside)
    except OSError:
        log.exception("could not move the damaged file %s aside", path)
    return aside


def temp_name(path: Path) -> Path:
    """Where write_atomic writes before the rename (a glob of ``.NAME.tmp-*`` finds leftovers)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def write_atomic(path: str | os.PathLike[str], data: bytes | Iterable[bytes], *, mode: int = 0o600,
                 uid: int | None = None, gid: int | None = None, sync_every: int | None = None) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written one by one).

    ``mode`` is set on the file before it appears (the umask does not apply);
    ``uid``/``gid`` are applied only when running as root (an ordinary user,
    staging a board or running the tests, keeps its own files).

    ``sync_every``: for a big file, have each that many bytes reach the disk
    (fdatasync) before more is written. One fsync of tens of MB at the end
    fills the card's queue at once, and every small write meanwhile (the
    gate's journal, on the same card) waits behind all of it: 26 ms on this
    machine's disk for an 87 MB list, seconds on a slow SD card. In pieces,
    a journal write waits behind one piece at most."""
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            pending = 0
            for chunk in ([data] if isinstance(data, (bytes, bytearray, memoryview)) else data):
                if not sync_every:
                    f.write(chunk)
                    continue
                view = memoryview(chunk).cast("B")
                at = 0
                while at < len(view):
                    piece = view[at:at + sync_every - pending]  # up to the next whole piece
                    f.write(piece)
                    at += len(piece)
                    pending += len(piece)
                    if pending == sync_every:
                        f.flush()
                        os.fdatasync(f.fileno())
                        pending = 0
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if os.geteuid() == 0 and (uid is not None or gid is not None):
            os.chown(tmp, -1 if uid is None else uid, -1 if gid is None else gid)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename or a new file in it survives a power cut. Quiet
    where it cannot be done: some filesystems refuse a directory fsync, and a rename
    is still atomic there."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


class LatestWriter:
    """Writes the newest of many snapshots on a thread of its own, so the thread that
    takes them (the gate thread) never waits for a disk: ``put(body)`` keeps only the
    last body handed on; ``write(body)`` (the callers' own, e.g. write_atomic with their
    error count) runs on the writer thread, and ``failed()`` is called there when it
    returns False. ``close()`` writes what is queued and stops the thread."""

    def __init__(self, write: Any, *, name: str, failed: Any = None) -> None:
        self._write = write
        self._failed = failed
        self._name = name
        self._cond = threading.Condition()
        self._queued: Any = None  # the newest body waiting for the writer
        self._thread: threading.Thread | None = None
        self._closing = False

    def put(self, body: Any) -> None:
        with self._cond:
            self._queued = body
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._queued is None and not self._closing:
                    self._cond.wait()
                body, self._queued = self._queued, None
                if body is None:
                    return
            if not self._write(body) and self._failed is not None:
                with self._cond:
                    self._failed()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
