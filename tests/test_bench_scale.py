"""bench/bench_scale.py in its tiniest run: 1,500 cards, a 1,500-card swap and a 10-card
delta, on the real service, mosquitto (shipped config, TLS) and the reference ingest.

It checks what the benchmark writes, not how fast anything is: every key issue 12 reads
is there with a figure, beside its goal and verdict, in the file given with --out (the
repository's bench/results.json is never touched), and the keys already in that file stay.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pki import broker_plugin

ROOT = Path(__file__).resolve().parent.parent


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@pytest.mark.long(8)
def test_the_tiniest_run_writes_footprint_and_swap_beside_the_other_keys(tmp_path):
    broker_plugin()  # skips (fails in CI) where mosquitto or the plugin is missing
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"decision": {"speedup": 7.0}}))
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_scale", "--sizes", "1500", "--swap-cards", "1500",
         "--delta-cards", "10", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["decision"] == {"speedup": 7.0}
    assert "machine" in data

    fp = data["footprint"]
    assert fp["method"] and fp["pi4_factor"] > 0
    row = fp["1500"]
    assert _number(row["rss_mb"]) and row["rss_mb"] > 0
    assert _number(row["ready_s"]) and row["ready_s"] > 0
    assert row["goal"] == {"rss_mb": 45.0, "ready_s": 0.3}
    assert row["meets"] == {k: row[k] <= g for k, g in row["goal"].items()}
    assert row["pi4_estimate"]["ready_s"] == round(row["ready_s"] * fp["pi4_factor"], 3)

    swap = data["swap"]
    assert swap["method"] and swap["cards"] == 1500 and swap["delta_cards"] == 10
    for key in ("apply_s", "peak_rss_mb", "delta_apply_s", "gate_stall_max_ms",
                "rss_before_mb", "rss_after_mb", "baseline_gate_stall_ms"):
        assert _number(swap[key]) and swap[key] >= 0, key
    assert swap["apply_s"] > 0 and swap["delta_apply_s"] > 0
    assert swap["peak_rss_mb"] >= swap["rss_before_mb"] or swap["peak_rss_since"] == "start"
    assert swap["gate_stall_max_ms"] == max(swap["snapshot_gate_stall_ms"], swap["delta_gate_stall_ms"])
    assert swap["cards_decided"] > 0  # cards were read throughout
    # The machine's own stalls, by a bare process, in the same three windows.
    assert set(swap["machine_stall_ms"]) == {"baseline", "snapshot", "delta"}
    assert all(_number(v) and v >= 0 for v in swap["machine_stall_ms"].values())
    assert set(swap["goal"]) == {"apply_s", "peak_rss_mb", "delta_apply_s", "gate_stall_max_ms"}
    assert swap["meets"] == {k: swap[k] <= g for k, g in swap["goal"].items()}
    assert set(swap["pi4_estimate"]) == {"apply_s", "delta_apply_s", "gate_stall_max_ms"}
