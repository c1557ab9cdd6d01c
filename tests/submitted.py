"""A thread-safe `submit` target for adapter tests: it records the events an
adapter hands to the gate thread and lets a test wait for what it expects."""
from __future__ import annotations

import threading
import time


class Events:
    def __init__(self) -> None:
        self.items: list = []
        self._cond = threading.Condition()

    def __call__(self, event) -> None:
        with self._cond:
            self.items.append(event)
            self._cond.notify_all()

    def wait(self, pred, timeout: float = 10.0, what: str = "") -> list:
        """Wait until pred(items) holds; re-checked on each event and every 10 ms
        (some conditions are on an adapter's counters, which change without an event)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred(self.items):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what or pred}; got {self.items}"
                self._cond.wait(min(left, 0.01))
            return list(self.items)

    def wait_for(self, n: int, timeout: float = 5.0) -> list:
        """Wait for at least n events."""
        return self.wait(lambda items: len(items) >= n, timeout, f"{n} events")

    def of(self, cls) -> list:
        with self._cond:
            return [e for e in self.items if isinstance(e, cls)]
