"""The machine's own stalls: how late a bare thread wakes, as a reference beside the gate's.

The gate-stall probe (agent.runtime.StallProbe) counts every moment the gate thread could
not run, whoever caused it: another thread of the agent holding the interpreter lock, or
the machine itself not running the process (other processes on too few cores, a virtual
machine's host taking the CPU away). This reference tells the two apart. It runs as a
process of its own, one thread, nothing else in it: it sleeps 1 ms again and again and
notes how much later than asked it woke. What it sees, the machine did; the gate thread
cannot do better in that window.

    python -m bench.machine_stall OUT_FILE

writes one line per wake later than 0.5 ms beyond the sleep, "<CLOCK_MONOTONIC s> <late
ms>", until it is stopped (SIGTERM). ``Reference`` starts it, stops it and takes the
largest late wake in a window of time.monotonic() (the same clock, system-wide).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SLEEP_S = 0.001
NOTE_ABOVE_S = 0.0005


def run(out: Path) -> int:
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    with open(out, "a", encoding="ascii", buffering=1) as f:
        while not stop:
            t0 = time.monotonic()
            time.sleep(SLEEP_S)
            t1 = time.monotonic()
            late = t1 - t0 - SLEEP_S
            if late > NOTE_ABOVE_S:
                f.write(f"{t1:.6f} {late * 1e3:.3f}\n")
    return 0


class Reference:
    """The reference process for the length of a run."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen | None = None

    def start(self) -> Reference:
        self.out.write_text("")
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.machine_stall", str(self.out)],
                                     cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def max_ms(self, since: float, until: float) -> float:
        """The latest wake, in ms beyond the sleep, that ended in (since, until] (0.0: none
        later than 0.5 ms). Read while it runs or after."""
        worst = 0.0
        try:
            text = self.out.read_text(encoding="ascii")
        except OSError:
            return worst
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue  # a line being written
            try:
                t, late = float(parts[0]), float(parts[1])
            except ValueError:
                continue
            if since < t <= until and late > worst:
                worst = late
        return round(worst, 3)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {os.path.basename(sys.executable)} -m bench.machine_stall OUT_FILE")
    sys.exit(run(Path(sys.argv[1])))
