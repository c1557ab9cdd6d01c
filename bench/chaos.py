"""`make chaos`: the field's faults, one bounded run against the real parts.

    python -m bench.chaos [--quick] [--only NAME[,NAME...]] [--seed N]

Each fault runs the real pieces (the agent in its own process on simulated
hardware, driven through its `gate-agent sim` socket; a real mosquitto, with
the shipped broker files where the fault is about the broker; the reference
ingest; SQLite) and prints one line of figures. What must hold is zero:
undecided reads, lost events, accepted forgeries. Exit status 1 when any
fault's verdict is not met. The figures go to bench/chaos.json and, by hand,
into docs/reliability.md.

--quick shortens the long runs (the flood, the kill loop) for development.
CHAOS_FLOOD_RATE (default 5000) sets the flood's messages a second, e.g. 0
for the same run without a flood.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.contract import topics
from bench.chaos_rig import CardLoop, Verdict, lost, plain_rig, wait_for
from tests.agentproc import ROOT
from tests.broker import Observer

RESULTS = ROOT / "bench" / "chaos.json"


# --------------------------------------------------------------------------- faults


def fault_flood(work: Path, quick: bool, rng: random.Random) -> dict:
    """5,000 junk messages a second on the gate's cmd topic while cards are read."""
    import subprocess

    seconds = 15.0 if quick else 60.0
    with plain_rig(work, telemetry_s=1) as (broker, ingest, agent):
        agent.start()
        t = topics(agent.site, agent.gate)
        with Observer(broker, t["telemetry"], qos=0) as tel:
            wait_for(lambda: tel.records(), 10)
            rss0 = agent.rss_mb()
            flood = subprocess.Popen(
                [sys.executable, "-m", "tests.flooder", broker.host, str(broker.port), t["cmd"],
                 os.environ.get("CHAOS_FLOOD_RATE", "5000"), str(seconds)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
            mark = len(tel.records())
            loop = CardLoop(agent).start()
            rss_max = rss0
            while flood.poll() is None:
                rss_max = max(rss_max, agent.rss_mb())
                time.sleep(0.5)
            loop.stop()
            sent = json.loads(flood.stdout.read())["sent"]
            time.sleep(1.5)  # the last telemetry sample of the flood
            samples = tel.records()[mark:]
        p99 = max((s["decision_ms"]["p99"] for s in samples if s["decision_ms"]["p99"] is not None),
                  default=None)
        dropped_hw = max((s.get("queues", {}).get("dropped", {}).get("hardware", 0) for s in samples),
                         default=0)
        agent.stop()
        records = agent.records()
        flood_records = sum(1 for r in records if r["type"] == "command.result" or
                            (r["type"] == "alarm" and r.get("kind") == "downlink_flood"))
        decided = loop.decided()
        wait_for(lambda: lost(decided, ingest.events()) == 0, 20)
        out = {"seconds": seconds, "junk_sent": sent, "reads": len(loop.replies),
               "undecided": loop.undecided() + loop.errors, "decision_p99_ms": p99,
               "dropped_hardware": dropped_hw, "rss_growth_mb": round(rss_max - rss0, 1),
               "journal_records_from_flood": flood_records,
               "lost": lost(decided, ingest.events())}
        if out["undecided"] or out["lost"] or flood_records >= 100 or out["rss_growth_mb"] >= 50:
            raise Verdict(out)
        if p99 is None or p99 >= 10:
            raise Verdict({**out, "why": "card decision p99 not under 10 ms"})
        return out


def fault_kill9(work: Path, quick: bool, rng: random.Random) -> dict:
    """SIGKILL the agent at random moments while cards are read; restart it each time."""
    kills = 8 if quick else 30
    decided: list[dict] = []
    undecided = 0
    with plain_rig(work) as (_broker, ingest, agent):
        for _ in range(kills):
            agent.start()
            loop = CardLoop(agent, pause_s=0.05).start()
            time.sleep(rng.uniform(0.3, 1.5))
            agent.kill()
            loop.stop()
            decided += loop.decided()
            undecided += loop.undecided()
        agent.start()
        wait_for(lambda: lost(decided, ingest.events()) == 0, 60)
        agent.stop()
        stored = ingest.events(agent.site, agent.gate)
        seqs = sorted(e["seq"] for e in stored if e["id"].startswith(stored[0]["id"].split(":")[0]))
        gaps = (seqs[-1] - len(seqs)) if seqs else 0
        out = {"kills": kills, "decisions": len(decided), "undecided": undecided,
               "lost": lost(decided, stored), "seq_gaps": gaps}
        if out["lost"] or gaps:
            raise Verdict(out)
        return out


def fault_broker(work: Path, quick: bool, rng: random.Random) -> dict:
    """Kill the broker (SIGKILL, no persistence) and bring it back, under load."""
    outages = 3 if quick else 6
    with plain_rig(work) as (broker, ingest, agent):
        agent.start()
        loop = CardLoop(agent).start()
        for _ in range(outages):
            time.sleep(rng.uniform(0.5, 2.0))
            broker.kill()
            time.sleep(rng.uniform(0.5, 3.0))
            broker.start()
        time.sleep(1)
        loop.stop()
        decided = loop.decided()
        wait_for(lambda: lost(decided, ingest.events()) == 0, 60)
        out = {"outages": outages, "decisions": len(decided),
               "undecided": loop.undecided() + loop.errors, "lost": lost(decided, ingest.events())}
        if out["lost"] or out["undecided"]:
            raise Verdict(out)
        return out


Fault = Callable[[Path, bool, random.Random], dict]
FAULTS: dict[str, Fault] = {
    "flood": fault_flood,
    "kill9": fault_kill9,
    "broker": fault_broker,
}
# More faults live in modules of their own, each with a FAULTS dict of the same shape.
for _module in ("bench.chaos_broker", "bench.chaos_journal"):
    try:
        FAULTS.update(__import__(_module, fromlist=["FAULTS"]).FAULTS)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:
            raise


def _line(name: str, ok: bool, figures: dict, took: float) -> str:
    text = ", ".join(f"{k} {v}" for k, v in figures.items())
    return f"chaos: {name:<12} {'ok  ' if ok else 'FAIL'} {text} ({took:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (development)")
    p.add_argument("--only", default="", help="comma-separated fault names: " + ", ".join(FAULTS))
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        p.error(f"unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    # The in-process ingest's warnings (a broker killed on purpose) are not figures.
    logging.basicConfig(level=logging.ERROR, format="chaos: log: %(name)s: %(message)s")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"chaos: seed {seed}{' (quick)' if args.quick else ''}; faults: {', '.join(names)}", flush=True)
    results: dict[str, Any] = {}
    failed = []
    t_all = time.monotonic()
    for name in names:
        rng = random.Random(f"{seed}:{name}")
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            try:
                figures, ok = FAULTS[name](Path(tmp), args.quick, rng), True
            except Verdict as v:
                figures, ok = (v.args[0] if isinstance(v.args[0], dict) else {"why": str(v)}), False
            except Exception as exc:  # noqa: BLE001 - a broken rig is a failure too, with its reason
                figures, ok = {"error": f"{type(exc).__name__}: {exc}"[:300]}, False
        took = time.monotonic() - t0
        print(_line(name, ok, figures, took), flush=True)
        results[name] = {"ok": ok, "seconds": round(took, 1), **figures}
        if not ok:
            failed.append(name)
    doc = {"seed": seed, "quick": args.quick, "machine": f"{platform.machine()}, {os.cpu_count()} CPU",
           "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "total_s": round(time.monotonic() - t_all, 1), "faults": results}
    if not args.only:
        RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"chaos: {len(names) - len(failed)} of {len(names)} held"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
