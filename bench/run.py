"""`make bench`: run every benchmark, each in its own process, and merge their
figures into bench/results.json (each benchmark writes its own key).

Quick mode for development: BENCH_QUICK=1 passes each benchmark's smaller
defaults where it has them.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHES = [
    ("decision", "bench.bench_decision", []),
    ("latency", "bench.bench_latency", []),
    ("journal", "bench.bench_journal", []),
    ("replay", "bench.bench_replay", []),
    ("scale", "bench.bench_scale", []),
    ("console", "bench.bench_console", []),
]
QUICK_ARGS = {
    "bench.bench_decision": ["--cards", "100000", "--reads", "50000"],
    "bench.bench_replay": ["--events", "100000"],
    "bench.bench_scale": ["--quick"],
    "bench.bench_console": ["--pages", "10", "--cards", "5"],
}


def main() -> int:
    quick = os.environ.get("BENCH_QUICK") == "1"
    failed = []
    for key, module, args in BENCHES:
        if importlib.util.find_spec(module) is None:
            print(f"bench: {module} not present, skipping {key}")
            continue
        extra = QUICK_ARGS.get(module, []) if quick else []
        print(f"bench: {key} ({module} {' '.join(args + extra)})", flush=True)
        t0 = time.monotonic()
        res = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=ROOT, check=False)
        print(f"bench: {key} done in {time.monotonic() - t0:.1f} s, exit {res.returncode}", flush=True)
        if res.returncode:
            failed.append(key)
    path = ROOT / "bench" / "results.json"
    if path.exists():
        print(json.dumps(json.loads(path.read_text()), indent=2))
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
