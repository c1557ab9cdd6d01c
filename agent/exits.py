"""The exit codes of `gate-agent` and every one of its tools, in one place.

A script (a technician's, the bundle's first boot, the regional side's) can
tell from the code alone what happened:

- 0 OK: done, or nothing is wrong.
- 1 FAILED: the tool ran and the answer is "no": doctor found a FAIL, a
  scenario's expectation was not met, a command or list was refused, a
  bundle is partial, the service could not start or crashed.
- 2 USAGE: the input cannot be used, and nothing was done: a bad option, an
  invalid config, scenario, list or journal file. The message says which.
- 3 UNAVAILABLE: what the tool needs is held or did not answer: the running
  service holds the pins or the port, the gate or the broker gave no reply
  in time.
"""
from __future__ import annotations

from enum import IntEnum

__all__ = ["Exit"]


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
