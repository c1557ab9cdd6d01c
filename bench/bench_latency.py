"""Card-to-relay latency through the real gate thread, and frames cut under load.

`.venv/bin/python -m bench.bench_latency` (about three minutes): from the
last Wiegand edge of a card's frame to the unlock output changing, over
--reads fixed-format (26-bit) reads, then --timeout-reads reads whose frame
ends by silence (--silence-ms, default 25, plus the reader's lag bound
--max-lag-ms, default the agent's), then --load-reads reads through the
real mock pins with a busy loop pinned to every core. Writes
bench/results.json key "latency": reads, p50_ms, p99_ms, p999_ms (fixed
format), timeout_mode_p50_ms, cut_frames (frames that were whole on the wire
but did not decode whole, over all three runs: must stay 0), wire_spoiled
(frames whose own edge stamps broke the Wiegand timing because the bench
thread lost the CPU mid-frame: no decoder could read them), and "load": the
loaded run's figures, among them lag_max_ms, the longest an edge callback
came after its edge (the readers' own measure), and lag_p50_ms, lag_p99_ms,
lag_p999_ms: how late the edges were called back.

The path measured is the service's: WiegandReader (the edge callback's
work) -> decoder -> GateRuntime.submit -> gate thread: core decision on a
fastpath table, commit to the SQLite journal (agent.uplink.journal, in a
temporary directory, with its sync thread; --sink memory for the in-memory
sink), TurnstileIO on gpiozero mock pins (wrapped to stamp the moment
unlock_a/unlock_b goes active). Meanwhile the gate thread handles a PASS for
every read (so the lane is free for the next card) and reader.status
events, some queued just ahead of a card. The gate runs in potential relay
mode: a pulse mode line rests 100 ms between pulses, which would only slow
the benchmark, not change the path measured.

The first two runs feed the reader explicit timestamps (WiegandReader.feed_edges,
time.monotonic()): the first edges of a frame stamped in the recent past at
realistic spacing (20-100 us pulses, 0.2-2 ms gaps), the last one now. The
loaded run drives the readers' D0/D1 mock pins the way lgpio delivers a
Pi's edges: each edge carries its time on the wire (the kernel's stamp) and
one thread calls back in order, as late as the loaded machine makes it;
latency there is from the last edge's stamp. The busy loops are one process
per core the bench may run on (`while True: pass`, pinned), killed at the end.
"""
from __future__ import annotations

import argparse
import gc
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from agent.hw.wiegand_gpio import DEFAULT_MAX_LAG_S, WiegandReader
from agent.runtime import Clock, GateRuntime, percentiles_ms
from agent.simhw import WirePin
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


SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True:\n    pass\n"


def spin_threads(n: int, stop: threading.Event) -> list[threading.Thread]:
    """n threads in this process spinning in Python, each taking the GIL in turn as a flood of
    messages parsed on the MQTT thread would."""
    def spin() -> None:
        while not stop.is_set():
            pass

    threads = [threading.Thread(target=spin, name=f"busy-{i}", daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def spin_every_core() -> list[subprocess.Popen]:
    """One busy process pinned to each core this process may run on."""
    return [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)]) for cpu in sorted(os.sched_getaffinity(0))]


@contextmanager
def busy_machine(busy_threads: int) -> Iterator[int]:
    """A busy process on every core and ``busy_threads`` threads spinning in this process
    (the GIL pressure of a message flood), for the ``with`` block; yields the cores busied."""
    spinners = spin_every_core()
    stop = threading.Event()
    busy = spin_threads(busy_threads, stop)
    try:
        time.sleep(0.5)  # let them take the cores
        yield len(spinners)
    finally:
        stop.set()
        for t in busy:
            t.join()
        for p in spinners:
            p.kill()
            p.wait()


@dataclass
class RunResult:
    latencies: list[float] = field(default_factory=list)  # seconds, of the reads that reached the gate
    cut: list[int] = field(default_factory=list)  # reads whole on the wire that did not decode whole
    spoiled: list[int] = field(default_factory=list)  # reads whose own stamps broke the timing
    lag_max_s: float = 0.0  # the longest an edge callback came after its edge (the readers' own measure)
    lags: list[float] = field(default_factory=list)  # how late each edge was driven (mock pins only)


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


def run(reads: int, *, fixed: bool, silence_s: float, max_lag_s: float, cards: int, seed: int, sink: str,
        pins: bool = False) -> RunResult:
    """Run reads through the gate; see _run."""
    kw = {"fixed": fixed, "silence_s": silence_s, "max_lag_s": max_lag_s, "cards": cards, "seed": seed,
          "pins": pins}
    if sink == "memory":
        return _run(reads, journal=None, **kw)
    from agent.uplink.journal import Journal

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmp:
        journal = Journal(Path(tmp) / "events.db", clock=Clock().now, boot="bench")
        journal.start_sync_thread()
        try:
            return _run(reads, journal=journal, **kw)
        finally:
            journal.close()


def _run(reads: int, *, fixed: bool, silence_s: float, max_lag_s: float, cards: int, seed: int, journal,
         pins: bool) -> RunResult:
    table, keys = build_table(cards)
    profile = load_profile("pi4-relay4")
    factory = MockFactory(pin_class=WirePin) if pins else MockFactory()
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
    decoder = {"fixed_bits": 26, "silence_s": silence_s} if fixed else {"silence_s": silence_s}
    names = ("entry", "exit")
    wires = {name: (profile.readers[name].d0, profile.readers[name].d1) if pins else (None, None)
             for name in names}
    readers = {name: WiegandReader(name, *wires[name], factory=factory if pins else None, submit=rt.submit,
                                   decoder_kwargs=decoder, max_lag_s=max_lag_s)
               for name in names}
    rng = random.Random(seed)
    res = RunResult()
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
            if i % 4 == 0:
                rt.submit(ev.ReaderStatus(name, online=True))  # queued just ahead of the card
            if pins:
                t_last, spoiled = _drive(factory, wires[name], edges, res.lags), False
            else:
                t_last, spoiled = _feed(reader, edges, silence_s)
            if not driver.opened.wait(silence_s + max_lag_s + 2.0):
                if reader.counters["errors"] > errors_before:
                    if spoiled:
                        # The bench thread lost the CPU for longer than the frame-end
                        # silence mid-frame: the stamps themselves have the gap.
                        res.spoiled.append(i)
                        if len(res.spoiled) > max(10, reads // 100):
                            raise RuntimeError(f"{len(res.spoiled)} frames spoiled by scheduling delays over "
                                               f"{silence_s * 1000:g} ms: the machine is too loaded to measure")
                    else:
                        res.cut.append(i)
                    deadline = time.monotonic() + 2.0 + max_lag_s
                    while reader.decoder.pending_bits and time.monotonic() < deadline:
                        time.sleep(0.005)  # let the rest of the cut frame end by silence
                    continue
                raise RuntimeError(f"read {i}: the unlock output never changed "
                                   f"(gate mode {gate.mode}, lane {gate.lane}, counters {rt.counters})")
            res.latencies.append(driver.opened_at - t_last)
            rt.submit(ev.PassSensor("A" if name == "entry" else "B"))
            if not driver.closed.wait(5):
                raise RuntimeError(f"read {i}: the passage did not close the lane")
        if rt.counters["core_errors"] or rt.counters["sink_errors"] or rt.counters["output_errors"]:
            raise RuntimeError(f"errors during the run: {rt.counters}")
    finally:
        rt.stop()
        res.lag_max_s = max(r.counters["lag_max_us"] for r in readers.values()) / 1e6
        for r in readers.values():
            r.close()
        io.close()
    return res


def _feed(reader: WiegandReader, edges: list[tuple[float, int, int]], silence_s: float) -> tuple[float, bool]:
    """Feed a frame with explicit stamps; returns the last edge's time and whether the
    stamps themselves have a gap of the frame-end silence (the bench thread lost the CPU)."""
    now = time.monotonic()
    # All but the last bit's pulse, stamped in the recent past.
    reader.feed_edges([(now + dt, line, level) for dt, line, level in edges[:-2]])
    # The last pulse ends now; its fall is stamped from the same instant,
    # so a descheduled bench thread cannot stretch it into a stuck line.
    t_last = time.monotonic()
    pulse = -edges[-2][0]
    line = edges[-1][1]
    reader.feed_edges([(t_last - pulse, line, 0), (t_last, line, 1)])
    return t_last, (t_last - pulse) - (now + edges[-3][0]) >= silence_s


def _drive(factory: MockFactory, wire: tuple[int, int], edges: list[tuple[float, int, int]],
           lags: list[float]) -> float:
    """Drive a frame on a reader's D0/D1 mock pins, lgpio's way: each edge with its time on
    the wire, in order, called back at that time or, on a loaded machine, later (appended to
    lags). Returns the last edge's time."""
    t_last = time.monotonic() - edges[0][0] + 1e-3
    pins = (factory.pin(f"GPIO{wire[0]}"), factory.pin(f"GPIO{wire[1]}"))
    for dt, line, level in edges:
        t = t_last + dt
        wait = t - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        lags.append(time.monotonic() - t)
        pins[line].drive_at(t, level)
    return t_last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=10_000, help="fixed-format reads (default 10000)")
    ap.add_argument("--timeout-reads", type=int, default=300,
                    help="reads ending by silence; each waits the silence and the lag bound (default 300)")
    ap.add_argument("--load-reads", type=int, default=300,
                    help="reads through the mock pins with a busy loop on every core, half of them "
                         "ending by silence (default 300; 0: skip)")
    ap.add_argument("--busy-threads", type=int, default=1,
                    help="threads spinning in the bench process during the loaded run, contending for "
                         "the GIL (default 1)")
    ap.add_argument("--silence-ms", type=float, default=25.0, help="frame-end silence (default 25)")
    ap.add_argument("--max-lag-ms", type=float, default=DEFAULT_MAX_LAG_S * 1000,
                    help=f"the readers' edge callback lag bound (default {DEFAULT_MAX_LAG_S * 1000:g}, "
                         "hardware.wiegand_max_lag_s)")
    ap.add_argument("--cards", type=int, default=20_000, help="cards in the access list (default 20000)")
    ap.add_argument("--sink", choices=("journal", "memory"), default="journal",
                    help="where records are committed (default: the SQLite journal)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/results.json alone")
    args = ap.parse_args(argv)
    if args.reads < 1 or args.timeout_reads < 1 or args.load_reads < 0:
        ap.error("--reads and --timeout-reads must be at least 1, --load-reads at least 0")
    common = {"silence_s": args.silence_ms / 1000, "max_lag_s": args.max_lag_ms / 1000, "cards": args.cards,
              "sink": args.sink}

    gc.collect()
    t0 = time.monotonic()
    fixed = run(args.reads, fixed=True, seed=args.seed, **common)
    t1 = time.monotonic()
    timeout = run(args.timeout_reads, fixed=False, seed=args.seed + 1, **common)
    t2 = time.monotonic()
    loaded: list[RunResult] = []
    spinners = 0
    if args.load_reads:
        with busy_machine(args.busy_threads) as spinners:
            loaded.append(run(args.load_reads - args.load_reads // 2, fixed=True, seed=args.seed + 2,
                              pins=True, **common))
            loaded.append(run(args.load_reads // 2, fixed=False, seed=args.seed + 3, pins=True, **common))
    t3 = time.monotonic()
    runs = [fixed, timeout, *loaded]
    result = {
        "reads": len(fixed.latencies),
        "cut_frames": sum(len(r.cut) for r in runs),
        "wire_spoiled": sum(len(r.spoiled) for r in runs),
        **percentiles_ms(fixed.latencies),
        "timeout_mode_p50_ms": percentiles_ms(timeout.latencies)["p50_ms"],
        "timeout_mode_reads": len(timeout.latencies),
        "silence_ms": args.silence_ms,
        "max_lag_ms": args.max_lag_ms,
        "fastpath": fastpath.IMPLEMENTATION,
        "sink": args.sink,
    }
    line = (f"latency: fixed-format {len(fixed.latencies)} reads in {t1 - t0:.1f} s: "
            f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, p99.9 {result['p999_ms']} ms, "
            f"max {max(fixed.latencies) * 1000:.3f} ms; silence-ended {len(timeout.latencies)} reads in "
            f"{t2 - t1:.1f} s: p50 {result['timeout_mode_p50_ms']} ms")
    if loaded:
        lf, lt = loaded
        result["load"] = {
            "spinners": spinners,
            "busy_threads": args.busy_threads,
            "reads": args.load_reads,
            "cut_frames": len(lf.cut) + len(lt.cut),
            "fixed_p50_ms": percentiles_ms(lf.latencies).get("p50_ms"),
            "fixed_p99_ms": percentiles_ms(lf.latencies).get("p99_ms"),
            "timeout_mode_p50_ms": percentiles_ms(lt.latencies).get("p50_ms"),
            "timeout_mode_p99_ms": percentiles_ms(lt.latencies).get("p99_ms"),
            "lag_max_ms": round(max(lf.lag_max_s, lt.lag_max_s) * 1000, 3),
            **{f"lag_{k}": v for k, v in percentiles_ms(lf.lags + lt.lags).items()},
        }
        ld = result["load"]
        line += (f"; under load ({ld['spinners']} busy cores, {args.busy_threads} busy threads, mock pins) "
                 f"{args.load_reads} reads in "
                 f"{t3 - t2:.1f} s: {ld['cut_frames']} cut, fixed p50 {ld['fixed_p50_ms']} ms / p99 "
                 f"{ld['fixed_p99_ms']} ms, silence-ended p50 {ld['timeout_mode_p50_ms']} ms, "
                 f"callback lag p99 {ld.get('lag_p99_ms')} ms, p99.9 {ld.get('lag_p999_ms')} ms, "
                 f"max {ld['lag_max_ms']} ms")
    print(f"{line}; cut frames {result['cut_frames']}, wire spoiled {result['wire_spoiled']} "
          f"(fastpath {fastpath.IMPLEMENTATION}, sink {args.sink})")
    if not args.no_write:
        from bench.common import write_result

        write_result("latency", result)
    return 1 if result["cut_frames"] else 0


if __name__ == "__main__":
    sys.exit(main())
