"""Card-to-relay latency through the real gate thread.

`.venv/bin/python -m bench.bench_latency` (about a minute): from the last
Wiegand edge of a card's frame to the unlock output changing, over
--reads fixed-format (26-bit) reads, then --timeout-reads reads whose frame
ends by silence (--silence-ms, default 25). Writes bench/results.json key
"latency": reads, p50_ms, p99_ms, p999_ms (fixed format), timeout_mode_p50_ms.

The path measured is the service's: WiegandReader.feed_edges (the edge
callback's work) -> decoder -> GateRuntime.submit -> gate thread: core
decision on a fastpath table, commit to the SQLite journal (agent.uplink.journal,
in a temporary directory, with its sync thread; --sink memory for the
in-memory sink), TurnstileIO on gpiozero mock pins
(wrapped to stamp the moment unlock_a/unlock_b goes active). Edge
timestamps are time.monotonic() when fed; the first edges of a frame are
stamped in the recent past at realistic spacing (20-100 us pulses, 0.2-2 ms
gaps), the last one now. Meanwhile the gate thread handles a PASS for every
read (so the lane is free for the next card) and reader.status events, some
queued just ahead of a card. The gate runs in potential relay mode: a pulse
mode line rests 100 ms between pulses, which would only slow the benchmark,
not change the path measured.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

from gpiozero.pins.mock import MockFactory

import fastpath
from agent.core import events as ev
from agent.core.cards import encode_w26
from agent.core.gateconfig import GateConfig
from agent.core.records import SequenceSink
from agent.core.turnstile import Gate
from agent.hw.profiles import load_profile
from agent.hw.turnstile_io import TurnstileIO
from agent.hw.wiegand_gpio import WiegandReader
from agent.runtime import Clock, GateRuntime, percentiles_ms
from fastpath import codes
from fastpath.columns import TableColumns

UNLOCK = {"unlock_a", "unlock_b"}


class StampingDriver:
    """TurnstileIO, plus the time each unlock line went active / inactive."""

    def __init__(self, inner: TurnstileIO) -> None:
        self.inner = inner
        self.opened_at: float | None = None
        self.opened = threading.Event()
        self.closed = threading.Event()

    def set(self, line: str, active: bool) -> None:
        self.inner.set(line, active)
        if line in UNLOCK:
            if active:
                self.opened_at = time.monotonic()
                self.opened.set()
            else:
                self.closed.set()

    def feedback(self, reader: str, signal: str) -> None:
        self.inner.feedback(reader, signal)


def build_table(n_cards: int):
    """n_cards cards, one person each, allowed at all times."""
    everywhere = b"\xff" * codes.BITMAP_BYTES
    rng = random.Random(7)
    keys = sorted(rng.sample(range(1, 1 << 24), n_cards))
    return fastpath.Table(TableColumns(
        version="bench", card_keys=array("Q", keys), card_person=array("i", range(n_cards)),
        card_flags=array("B", bytes(n_cards)), person_ids=[f"p-{i}" for i in range(n_cards)],
        person_from=array("q", [codes.NO_START] * n_cards), person_until=array("q", [codes.NO_END] * n_cards),
        person_groupset=array("i", [0] * n_cards), person_flags=array("B", bytes(n_cards)),
        person_max_uses=array("i", [0] * n_cards),
        gs_entry=[everywhere], gs_entry_holiday=[everywhere], gs_exit=[everywhere],
    )), keys


def relative_edges(bits: str, rng: random.Random) -> list[tuple[float, int, int]]:
    """A frame's edges with times relative to its last edge (which is at 0)."""
    edges = []
    t = 0.0
    for i, b in enumerate(bits):
        if i:
            t += rng.uniform(0.2e-3, 2e-3)
        edges.append((t, int(b), 0))
        edges.append((t + rng.uniform(20e-6, 100e-6), int(b), 1))
    end = edges[-1][0]
    return [(e[0] - end, e[1], e[2]) for e in edges]


def run(reads: int, *, fixed: bool, silence_s: float, cards: int, seed: int, sink: str) -> list[float]:
    """Latencies (s) of the reads that reached the gate; see _run."""
    if sink == "memory":
        return _run(reads, fixed=fixed, silence_s=silence_s, cards=cards, seed=seed, journal=None)
    from agent.uplink.journal import Journal

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        journal = Journal(Path(tmp) / "events.db", clock=Clock().now, boot="bench")
        journal.start_sync_thread()
        try:
            return _run(reads, fixed=fixed, silence_s=silence_s, cards=cards, seed=seed, journal=journal)
        finally:
            journal.close()


def _run(reads: int, *, fixed: bool, silence_s: float, cards: int, seed: int, journal) -> list[float]:
    table, keys = build_table(cards)
    profile = load_profile("pi4-relay4")
    factory = MockFactory()
    holder: list[GateRuntime] = []
    io = TurnstileIO(profile, factory=factory, submit=lambda e: holder[0].submit(e))
    driver = StampingDriver(io)
    cfg = GateConfig(relay_mode="potential", wait_s=5.0, pulse_s=0.1)
    gate = Gate(cfg, fastpath, table, implementation=fastpath.IMPLEMENTATION)
    if journal is None:
        rt = GateRuntime(gate, SequenceSink("bench"), outputs=driver)
    else:
        rt = GateRuntime(gate, journal, outputs=driver, on_idle=lambda now: journal.maintenance(now.wall))
    holder.append(rt)
    decoder = {"fixed_bits": 26} if fixed else {"silence_s": silence_s}
    readers = {name: WiegandReader(name, None, None, submit=rt.submit, decoder_kwargs=decoder)
               for name in ("entry", "exit")}
    rng = random.Random(seed)
    latencies: list[float] = []
    spoiled: list[int] = []
    # Keep the passage sensors and the Ready line at rest (closed).
    for name in ("pass_a", "pass_b", "ready", "fire_loop", "tamper"):
        factory.pin(f"GPIO{profile.inputs[name].pin}").drive_low()
    io.start()
    rt.start()
    try:
        for i in range(reads):
            name = "entry" if i % 2 == 0 else "exit"
            key = keys[rng.randrange(len(keys))]
            edges = relative_edges(encode_w26(key >> 16, key & 0xFFFF), rng)
            driver.opened.clear()
            driver.closed.clear()
            reader = readers[name]
            errors_before = reader.counters["errors"]
            now = time.monotonic()
            # All but the last bit's pulse, stamped in the recent past.
            reader.feed_edges([(now + dt, line, level) for dt, line, level in edges[:-2]])
            if i % 4 == 0:
                rt.submit(ev.ReaderStatus(name, online=True))  # queued just ahead of the card
            # The last pulse ends now; its fall is stamped from the same instant,
            # so a descheduled bench thread cannot stretch it into a stuck line.
            t_last = time.monotonic()
            pulse = -edges[-2][0]
            line = edges[-1][1]
            reader.feed_edges([(t_last - pulse, line, 0), (t_last, line, 1)])
            if not driver.opened.wait(silence_s + 2.0):
                if reader.counters["errors"] > errors_before:
                    # The bench thread lost the CPU for longer than the frame-end
                    # silence mid-frame: the frame was cut, as on a real line.
                    spoiled.append(i)
                    if len(spoiled) > max(10, reads // 100):
                        raise RuntimeError(f"{len(spoiled)} frames cut by scheduling delays over "
                                           f"{silence_s * 1000:g} ms: the machine is too loaded to measure")
                    deadline = time.monotonic() + 2.0
                    while reader.decoder.pending_bits and time.monotonic() < deadline:
                        time.sleep(0.005)  # let the rest of the cut frame end by silence
                    continue
                raise RuntimeError(f"read {i}: the unlock output never changed "
                                   f"(gate mode {gate.mode}, lane {gate.lane}, counters {rt.counters})")
            latencies.append(driver.opened_at - t_last)
            rt.submit(ev.PassSensor("A" if name == "entry" else "B"))
            if not driver.closed.wait(5):
                raise RuntimeError(f"read {i}: the passage did not close the lane")
        if rt.counters["core_errors"] or rt.counters["sink_errors"] or rt.counters["output_errors"]:
            raise RuntimeError(f"errors during the run: {rt.counters}")
    finally:
        rt.stop()
        for r in readers.values():
            r.close()
        io.close()
    return latencies


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=10_000, help="fixed-format reads (default 10000)")
    ap.add_argument("--timeout-reads", type=int, default=1_000,
                    help="reads ending by silence; each waits the silence (default 1000)")
    ap.add_argument("--silence-ms", type=float, default=25.0, help="frame-end silence (default 25)")
    ap.add_argument("--cards", type=int, default=20_000, help="cards in the access list (default 20000)")
    ap.add_argument("--sink", choices=("journal", "memory"), default="journal",
                    help="where records are committed (default: the SQLite journal)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = ap.parse_args(argv)
    if args.reads < 1 or args.timeout_reads < 1:
        ap.error("--reads and --timeout-reads must be at least 1")

    gc.collect()
    t0 = time.monotonic()
    fixed = run(args.reads, fixed=True, silence_s=args.silence_ms / 1000, cards=args.cards, seed=args.seed,
                sink=args.sink)
    t1 = time.monotonic()
    timeout = run(args.timeout_reads, fixed=False, silence_s=args.silence_ms / 1000, cards=args.cards,
                  seed=args.seed + 1, sink=args.sink)
    t2 = time.monotonic()
    result = {
        "reads": len(fixed),
        "cut_frames": (args.reads - len(fixed)) + (args.timeout_reads - len(timeout)),
        **percentiles_ms(fixed),
        "timeout_mode_p50_ms": percentiles_ms(timeout)["p50_ms"],
        "timeout_mode_reads": len(timeout),
        "silence_ms": args.silence_ms,
        "fastpath": fastpath.IMPLEMENTATION,
        "sink": args.sink,
    }
    print(f"latency: fixed-format {len(fixed)} reads in {t1 - t0:.1f} s: "
          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, p99.9 {result['p999_ms']} ms, "
          f"max {max(fixed) * 1000:.3f} ms; silence-ended {len(timeout)} reads in {t2 - t1:.1f} s: "
          f"p50 {result['timeout_mode_p50_ms']} ms (fastpath {fastpath.IMPLEMENTATION}, sink {args.sink})")
    if not args.no_write:
        from bench.common import write_result

        write_result("latency", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
