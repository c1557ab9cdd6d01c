"""bench/machine_stall.py, the reference beside the gate-stall figure: a bare process that
notes how late it wakes. Stopping it (SIGSTOP) is the machine not running it: the late
wake must show in the window, and only there."""
from __future__ import annotations

import os
import signal
import time

from bench.machine_stall import Reference


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_a_process_kept_off_the_cpu_shows_as_a_late_wake_in_its_window(tmp_path):
    ref = Reference(tmp_path / "stall.txt").start()
    try:
        time.sleep(0.3)  # started and sleeping
        before = time.monotonic()
        os.kill(ref.proc.pid, signal.SIGSTOP)
        time.sleep(0.08)
        os.kill(ref.proc.pid, signal.SIGCONT)
        assert _wait_for(lambda: ref.max_ms(before, time.monotonic()) >= 60.0), (
            (tmp_path / "stall.txt").read_text())
        after = time.monotonic()
        # The window before the stop holds nothing of it.
        assert ref.max_ms(before - 60.0, before) < 60.0
        # Still running: it goes on noting after a stall.
        assert ref.proc.poll() is None
    finally:
        ref.stop()
    assert ref.proc.returncode == 0  # SIGTERM ends it cleanly
    assert ref.max_ms(before, after) >= 60.0  # read after it stopped, too


def test_the_window_takes_the_largest_complete_line_and_skips_a_torn_one(tmp_path):
    ref = Reference(tmp_path / "stall.txt")
    (tmp_path / "stall.txt").write_text("10.000000 2.500\n11.000000 7.250\n12.500000 3.000\n13.0000")
    assert ref.max_ms(9.0, 12.6) == 7.25
    assert ref.max_ms(11.0, 13.0) == 3.0  # (since, until]: 11.0 itself is out
    assert ref.max_ms(20.0, 30.0) == 0.0
    assert Reference(tmp_path / "absent.txt").max_ms(0.0, 1e9) == 0.0
