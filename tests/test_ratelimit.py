"""Rate-limited logging (agent.ratelimit) and the service's logging set-up."""
from __future__ import annotations

import logging
import subprocess
import sys

from agent.ratelimit import RateLimitFilter
from tests.conftest import ROOT


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def record(msg: str, *args, name: str = "agent.x", level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_flood_of_one_message_passes_a_burst_then_one_line_with_the_count():
    clock = Clock()
    f = RateLimitFilter(burst=3, interval_s=10, clock=clock)
    passed = [r for r in (record("command %r refused: %s", i, "invalid") for i in range(5000)) if f.filter(r)]
    assert len(passed) == 3
    assert f.suppressed_total == 4997
    clock.t = 10.5
    nxt = record("command %r refused: %s", 5000, "invalid")
    assert f.filter(nxt)
    assert nxt.getMessage() == ("command 5000 refused: invalid "
                                "[4997 similar message(s) suppressed in the last 10 s]")


def test_messages_are_limited_each_on_its_own():
    f = RateLimitFilter(burst=2, interval_s=10, clock=Clock())
    junk = [f.filter(record("junk %d", i)) for i in range(100)]
    card = [f.filter(record("card %s decided", i, name="agent.gate")) for i in range(2)]
    error = f.filter(record("junk %d", 1, level=logging.ERROR))  # another level: another message
    assert junk.count(True) == 2 and card == [True, True] and error


def test_flush_reports_the_counts_still_waiting(caplog):
    f = RateLimitFilter(burst=1, interval_s=10, clock=Clock())
    for i in range(7):
        f.filter(record("junk %d", i))
    with caplog.at_level(logging.WARNING, logger="agent.x"):
        waiting = f.flush()
    assert waiting == [("agent.x", logging.WARNING, "junk %d", 6)]
    assert "6 message(s) like 'junk %d' suppressed" in caplog.text
    assert f.flush() == []  # reported once


def test_a_clean_stop_after_logging_was_set_up_twice_prints_no_traceback():
    code = ("import logging; from agent.service import setup_logging; setup_logging('info'); "
            "setup_logging('debug'); log = logging.getLogger('agent.t'); "
            "[log.warning('same %d', i) for i in range(50)]; log.info('bye')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0
    assert "Traceback" not in out.stderr and "Error" not in out.stderr, out.stderr
    assert out.stderr.count("same ") == 11  # 10 lines, then the count at stop
    assert "40 message(s) like 'same %d' suppressed" in out.stderr
    assert "bye" in out.stderr
