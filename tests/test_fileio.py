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
