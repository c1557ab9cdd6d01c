"""Read-only filesystems for tests, made the way a failing SD card makes them.

``read_only(path)``: ``path`` bind-mounted on itself, then remounted
read-only (``mount -o remount,bind,ro``); the yielded function switches it
between read-only and read-write. Files already open for writing block that
switch (the kernel answers EBUSY), as they do on a real card: use it for a
card that is read-only when the agent starts.

``failing_card(dir)``: a small ext4 filesystem on a loop device, mounted
with ``errors=remount-ro`` like the Pi's root; the yielded function makes the
kernel record a filesystem error (``/sys/fs/ext4/<dev>/trigger_fs_error``),
after which the kernel refuses every write, to files already open too: the
card turning read-only under a running agent.

Both need root and mount (CI runs as root); otherwise the test is skipped
with the reason. Unmounted in a finally.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _need_mount(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (mount); CI runs as root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip(f"{what} needs mount and umount (util-linux)")


def _umount(path: Path) -> None:
    for _ in range(50):
        if _run("umount", str(path)).returncode == 0:
            return
        time.sleep(0.1)  # a connection the test just closed may still hold a file
    _run("umount", "-l", str(path))


@contextmanager
def read_only(path: Path) -> Iterator[Callable[[bool], None]]:
    """``path`` (a directory) read-only; the yielded ``set_ro(flag)`` switches it."""
    _need_mount("a read-only bind mount")
    path.mkdir(parents=True, exist_ok=True)
    got = _run("mount", "--bind", str(path), str(path))
    if got.returncode:
        pytest.skip(f"cannot bind-mount {path} here: {got.stderr.strip()}")

    def set_ro(ro: bool) -> None:
        got = _run("mount", "-o", f"remount,bind,{'ro' if ro else 'rw'}", str(path))
        assert got.returncode == 0, f"remount {'ro' if ro else 'rw'} {path}: {got.stderr.strip()}"

    try:
        set_ro(True)
        yield set_ro
    finally:
        _umount(path)


@contextmanager
def failing_card(mountpoint: Path, size_mb: int = 32) -> Iterator[Callable[[], None]]:
    """An ext4 filesystem at ``mountpoint``; the yielded ``fail()`` makes the
    kernel turn it read-only as after an SD card error."""
    _need_mount("a failing ext4 card")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("a failing card needs mkfs.ext4 (e2fsprogs)")
    mountpoint.mkdir(parents=True, exist_ok=True)
    image = mountpoint.with_name(mountpoint.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    got = _run("mkfs.ext4", "-q", "-F", str(image))
    assert got.returncode == 0, got.stderr
    got = _run("mount", "-o", "loop,errors=remount-ro", str(image), str(mountpoint))
    if got.returncode:
        pytest.skip(f"cannot mount an ext4 image on a loop device here: {got.stderr.strip()}")
    try:
        device = _run("findmnt", "-no", "SOURCE", str(mountpoint)).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            pytest.skip(f"this kernel has no {trigger} to simulate a card error")

        def fail() -> None:
            trigger.write_text("gate-agent test: the SD card failed\n")

        yield fail
    finally:
        _umount(mountpoint)
        image.unlink(missing_ok=True)
