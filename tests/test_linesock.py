"""agent/linesock.RecordWaiter: the records a request thread waits for after handing the
gate an event (the sim socket's card replies, the console socket's actions)."""
from __future__ import annotations

import threading
import time

from agent.linesock import RecordWaiter


def test_a_wait_sees_only_what_came_after_its_mark_and_what_matches():
    stopping = threading.Event()
    box = RecordWaiter(4, time.monotonic, stopping)
    box.put({"card": 1})
    mark = box.mark()
    box.put({"card": 2})
    box.put({"card": 1, "late": True})
    assert box.wait(mark, lambda r: r["card"] == 1, 0.0) == {"card": 1, "late": True}
    assert box.wait(mark, lambda r: r["card"] == 3, 0.05) is None  # none came: None after the timeout


def test_a_waiter_is_woken_by_the_record_it_waits_for_from_another_thread():
    box = RecordWaiter(4, time.monotonic, threading.Event())
    mark = box.mark()
    threading.Timer(0.05, box.put, args=({"card": 7},)).start()
    t0 = time.monotonic()
    assert box.wait(mark, lambda r: r["card"] == 7, 30.0) == {"card": 7}
    assert time.monotonic() - t0 < 29.0  # woken, not timed out


def test_stopping_wakes_a_waiter_with_none():
    stopping = threading.Event()
    box = RecordWaiter(4, time.monotonic, stopping)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(box.wait(box.mark(), lambda r: True, 30.0)))
    waiter.start()
    time.sleep(0.05)
    stopping.set()
    box.wake()
    waiter.join(5)
    assert not waiter.is_alive() and got == [None]


def test_only_the_last_records_are_kept():
    box = RecordWaiter(2, time.monotonic, threading.Event())
    for n in range(5):
        box.put({"n": n})
    assert box.wait(0, lambda r: r["n"] < 3, 0.0) is None  # 0..2 fell out
    assert box.wait(0, lambda r: r["n"] == 3, 0.0) == {"n": 3}
