"""Journal benchmark: sustained appends, one record per commit as the gate does.

``python -m bench.bench_journal`` commits one ``access.granted`` record at a
time for ``--seconds`` (default 5) with the sync thread fsyncing the WAL every
``--sync-interval`` seconds (default 1.0, the service default), then repeats
for a shorter run while an uplink thread drains the journal (``pending`` and
``ack_one``) and the gate calls ``maintenance`` every 100 commits, to show the
uplink does not slow the gate. Writes key ``journal`` into bench/results.json:
``append_per_s`` (the headline figure), commit latency percentiles, sync
figures, the WAL file's largest size (``wal_max_bytes``, goal: at most 64 MB;
sampled every 100 commits and by the journal each time it folds the WAL in),
how often the WAL started over (``wal_resets``) and the longest that held a
commit (``max_wal_reset_ms``), the journal's files at the end against the
disk budget, seqs missing after close (``records_missing``, must be 0), and
the same under uplink load.

``BENCH_QUICK=1`` (``make bench`` in quick mode) shortens the main run to 1.5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.core.events import Now
from agent.core.records import make_record
from agent.core.stats import nearest_rank
from agent.uplink.journal import Journal

ROOT = Path(__file__).resolve().parent.parent
BOOT = "5f0c1d2e-7a4b-4c3d-9e8f-0a1b2c3d4e5f"


def _now() -> Now:
    return Now(mono=time.monotonic(), wall=time.time(), synced=True)


def _record(i: int) -> dict:
    return make_record(
        "access.granted",
        _now(),
        BOOT,
        reader="entry",
        direction="in",
        card=6_613_779 + i,
        format="w26",
        person=f"p-{i % 1300:06d}",
    )


def _pct(sorted_s: list[float], q: float) -> float:
    return nearest_rank(sorted_s, q)


def run(directory: Path, seconds: float, sync_interval: float, uplink: bool) -> dict:
    journal = Journal(
        directory / "journal.db", sync_interval_s=sync_interval, clock=_now, boot=BOOT
    )
    journal.start_sync_thread()
    stop = threading.Event()
    drained = [0]

    def drain() -> None:
        while not stop.is_set():
            batch = journal.pending(0, 200)
            for rec in batch:
                journal.ack_one(rec["seq"])
            drained[0] += len(batch)
            if not batch:
                time.sleep(0.001)

    reader = threading.Thread(target=drain, name="bench-uplink", daemon=True) if uplink else None
    if reader is not None:
        reader.start()
    lat: list[float] = []
    wal_max = 0
    wal = Path(f"{journal.path}-wal")
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    try:
        while True:
            rec = _record(n)
            c0 = time.perf_counter()
            journal.commit([rec])
            c1 = time.perf_counter()
            lat.append(c1 - c0)
            n += 1
            if uplink and n % 100 == 0:
                journal.maintenance(time.time())
            if n % 100 == 0:
                try:
                    wal_max = max(wal_max, wal.stat().st_size)
                except FileNotFoundError:
                    pass
                if c1 >= end:
                    break
        elapsed = time.perf_counter() - t0
    finally:
        stop.set()
        if reader is not None:
            reader.join()
        stats = journal.stats()
        journal.close()
    missing = _missing_seqs(journal.path, stats["last_seq"])
    lat.sort()
    return {
        "append_per_s": round(n / elapsed, 1),
        "records": n,
        "seconds": round(elapsed, 2),
        "commit_p50_us": round(_pct(lat, 0.50) * 1e6, 1),
        "commit_p99_us": round(_pct(lat, 0.99) * 1e6, 1),
        "commit_p999_us": round(_pct(lat, 0.999) * 1e6, 1),
        "commit_max_ms": round(lat[-1] * 1e3, 3),
        "syncs": stats["syncs"],
        "max_sync_ms": round(stats["max_sync_s"] * 1e3, 3),
        "wal_max_bytes": max(wal_max, stats["wal_max_bytes"]),
        "wal_limit_bytes": stats["wal_limit_bytes"],
        "wal_resets": stats["wal_resets"],
        "wal_pinned": stats["wal_pinned"],
        "wal_gate_gave_up": stats["wal_busy_waits"],
        "max_wal_reset_ms": round(stats["max_wal_reset_s"] * 1e3, 3),
        "db_bytes_end": stats["db_bytes"],
        "disk_budget_bytes": stats["disk_budget_bytes"],
        "records_missing": missing,
        **({"uplink_drained": drained[0]} if uplink else {}),
    }


def _missing_seqs(path: Path, last_seq: int) -> int:
    """Seqs 1..last_seq not in the closed journal (must be 0: nothing lost)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        have = conn.execute("SELECT count(*) FROM events WHERE seq <= ?", (last_seq,)).fetchone()[0]
    finally:
        conn.close()
    return last_seq - have


def _write_result(key: str, value: dict) -> None:
    try:
        from bench.common import write_result
    except ImportError:
        write_result = _merge_json
    write_result(key, value)


def _merge_json(key: str, value: dict) -> None:
    """Merge one key into bench/results.json (atomic replace)."""
    path = ROOT / "bench" / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = value
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    quick = os.environ.get("BENCH_QUICK") == "1"
    ap.add_argument(
        "--seconds",
        type=float,
        default=1.5 if quick else 5.0,
        help="length of the main run (default 5; 1.5 with BENCH_QUICK=1)",
    )
    ap.add_argument(
        "--sync-interval",
        type=float,
        default=1.0,
        help="WAL fsync interval of the sync thread, seconds (default 1.0)",
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the journal (default: a temporary one; use the real "
        "data disk to measure it)",
    )
    ap.add_argument(
        "--no-write", action="store_true", help="print only; leave bench/results.json alone"
    )
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.sync_interval <= 0:
        ap.error("--seconds and --sync-interval must be positive")

    base = args.dir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=base) as tmp:
        main_run = run(Path(tmp) / "alone", args.seconds, args.sync_interval, uplink=False)
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=base) as tmp:
        busy = run(
            Path(tmp) / "uplink", max(1.0, args.seconds * 0.6), args.sync_interval, uplink=True
        )
    result = {
        **main_run,
        "sync_interval_s": args.sync_interval,
        "with_uplink": busy,
    }
    print(
        f"journal: {main_run['append_per_s']:,.0f} appends/s one record per commit "
        f"(sync every {args.sync_interval} s); commit p50 {main_run['commit_p50_us']} us, "
        f"p99 {main_run['commit_p99_us']} us, max {main_run['commit_max_ms']} ms; "
        f"with an uplink draining: {busy['append_per_s']:,.0f}/s, p99 {busy['commit_p99_us']} us, "
        f"max {busy['commit_max_ms']} ms; WAL at most {main_run['wal_max_bytes'] / 2**20:.1f} MiB "
        f"({busy['wal_max_bytes'] / 2**20:.1f} MiB with the uplink) against a limit of "
        f"{main_run['wal_limit_bytes'] / 2**20:.0f} MiB, emptied {main_run['wal_resets']} and "
        f"{busy['wal_resets']} times; records missing: {main_run['records_missing']} and "
        f"{busy['records_missing']}"
    )
    if not args.no_write:
        _write_result("journal", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
