"""agent.fileio.write_atomic: the old file or the new one, never a torn one."""
from __future__ import annotations

import os
import stat

import pytest

from agent.fileio import temp_name, write_atomic


def test_the_new_content_replaces_the_old_with_its_mode_whatever_the_umask(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    old = os.umask(0o077)
    try:
        write_atomic(path, [b"new ", memoryview(b"content")], mode=0o640)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert not list(tmp_path.glob(".state.json.tmp-*"))


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "acl.bin"
    path.write_bytes(b"the list in force")

    def chunks():
        yield b"half of the new list"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, chunks())
    assert path.read_bytes() == b"the list in force"
    assert not temp_name(path).exists() and not list(tmp_path.glob(".acl.bin.tmp-*"))


def test_a_big_file_reaches_the_disk_a_piece_at_a_time(tmp_path, monkeypatch):
    """sync_every: fdatasync after each that many bytes, whatever the chunks' sizes, and the
    file holds exactly what was given (pieces cut inside chunks and across them)."""
    import os as os_mod

    synced: list[int] = []
    real = os_mod.fdatasync
    monkeypatch.setattr(os_mod, "fdatasync", lambda fd: synced.append(os_mod.fstat(fd).st_size) or real(fd))
    chunks = [bytes([i]) * n for i, n in enumerate((3_000_000, 5_500_000, 100, 2_000_000))]
    target = tmp_path / "acl.bin"
    write_atomic(target, chunks, sync_every=4 << 20)
    assert target.read_bytes() == b"".join(chunks)
    assert synced == [4 << 20, 8 << 20]  # 10.5 MB: two whole pieces synced, the rest by the final fsync
    synced.clear()
    write_atomic(target, chunks)  # without: one fsync at the end only
    assert synced == []


def test_the_latest_writer_writes_the_newest_body_off_the_callers_thread_and_says_when_it_failed():
    import threading

    from agent.fileio import LatestWriter

    gate = threading.Event()
    written: list[tuple[str, str]] = []
    failures: list[int] = []

    def write(body):
        gate.wait(10)  # the disk is slow: bodies handed on meanwhile replace each other
        written.append((body, threading.current_thread().name))
        return body != "bad"

    w = LatestWriter(write, name="test-writer", failed=lambda: failures.append(1))
    w.put("one")
    for body in ("two", "three", "bad"):
        w.put(body)
    gate.set()
    w.close()
    bodies = [b for b, _ in written]
    assert bodies[-1] == "bad" and "two" not in bodies and len(bodies) <= 2
    assert {name for _, name in written} == {"test-writer"}
    assert failures == [1]
