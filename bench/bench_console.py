"""The console's speed and size, against a real agent: first page, live feed, memory.

    .venv/bin/python -m bench.bench_console [--pages N] [--cards N] [--out FILE]

Starts what a board runs: an agent on mock pins (tests/agentproc.py) and
`gate-agent console serve` beside it on loopback, as a board serves it: HTTPS
(the console's own certificate; --no-tls for plain HTTP), with one technician
account. Then, as a browser would, over HTTP (httpx):

* first_page: log in, then GET /status and every stylesheet and script it
  names. ``cold_ms`` is the first such load after the login (the console's
  first status request to the agent included); ``p50_ms`` / ``max_ms`` over
  --pages more loads; ``kb`` the page and its assets together.
* live: /live/events (Server-Sent Events) is open; a card goes in through the
  agent's simulated reader (its sim socket, as a real frame would). Latency
  is from the card request's send to the console's SSE event carrying that
  record's id: p50_ms and max_ms over --cards cards.
* rss_mb: the console process's VmRSS (/proc) after all of it; the agent's too,
  for comparison.

Goals (issue 15): first page under 300 ms and 200 KB; a card read reaches the
live page within 1 s; the console under 60 MB RSS. Writes key "console" into
bench/results.json.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, write_result

GOALS = {"first_page_ms": 300, "first_page_kb": 200, "live_ms": 1000, "rss_mb": 60}
ACCOUNT, PASSWORD = "bench", "bench password"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _login(client, base: str) -> None:
    page = client.get(base + "/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post(base + "/login", data={"csrf": token, "account": ACCOUNT, "password": PASSWORD,
                                           "next": "/status"}, follow_redirects=False)
    if r.status_code != 303:
        raise RuntimeError(f"login failed: HTTP {r.status_code}")


def _load(client, base: str) -> tuple[float, int]:
    """ms and bytes for /status and every asset it names."""
    t0 = time.perf_counter()
    page = client.get(base + "/status")
    size = len(page.content)
    for asset in re.findall(r'(?:href|src)="(/static/[^"]+)"', page.text):
        size += len(client.get(base + asset).content)
    return (time.perf_counter() - t0) * 1000, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=50)
    ap.add_argument("--cards", type=int, default=30)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    ap.add_argument("--no-tls", action="store_true", help="plain HTTP, as `make run`'s demo serves it")
    args = ap.parse_args(argv)

    import httpx

    from tests.agentproc import CARDS, AgentProcess, ConsoleProcess

    work = Path(tempfile.mkdtemp(prefix="bench-console-"))
    agent = AgentProcess(work).start()
    console = ConsoleProcess(agent, tls=not args.no_tls)
    base = console.base
    try:
        console.add_user(ACCOUNT, "technician", PASSWORD)
        console.start()
        started_rss = _rss_mb(console.proc.pid)

        with httpx.Client(timeout=10, verify=False) as client:
            _login(client, base)
            cold_ms, size = _load(client, base)
            times = [_load(client, base)[0] for _ in range(args.pages)]

        # Live: one SSE stream, cards in through the simulated reader.
        arrived: dict[str, float] = {}
        ready = threading.Event()
        stop = threading.Event()

        def listen() -> None:
            with httpx.Client(timeout=None, verify=False) as c:
                _login(c, base)
                with c.stream("GET", base + "/live/events") as r:
                    ready.set()
                    event = None
                    for line in r.iter_lines():
                        if stop.is_set():
                            return
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "record":
                            rec = json.loads(line[5:])
                            arrived.setdefault(rec.get("id"), time.perf_counter())

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        if not ready.wait(15):
            raise RuntimeError("the live stream did not open")
        time.sleep(1.0)  # the console's own watch on the agent is up
        live = []
        for i in range(args.cards):
            t0 = time.perf_counter()
            reply = agent.card(CARDS[i % len(CARDS)], wait=3)
            rid = (reply.get("decision") or {}).get("id")
            deadline = time.monotonic() + 5
            while rid not in arrived and time.monotonic() < deadline:
                time.sleep(0.002)
            if rid in arrived:
                live.append((arrived[rid] - t0) * 1000)
            agent.sim({"op": "pass", "side": "A"})
            time.sleep(0.3)
        stop.set()
        rss = _rss_mb(console.proc.pid)
        agent_rss = agent.rss_mb()
    finally:
        console.stop()
        agent.stop()

    result = {
        "method": "Agent on mock pins and `gate-agent console serve` (loopback; HTTPS with the "
                  "console's own certificate unless --no-tls) as two processes; httpx as the browser "
                  "(one keep-alive connection). first_page: GET /status after login plus every "
                  "/static asset it names; cold = the first load; p50/max over the next loads. live: "
                  "card sent through the agent's sim socket until the console's SSE 'record' event "
                  "with that id. rss: VmRSS of the console process at the end.",
        "first_page": {"cold_ms": round(cold_ms, 1), "p50_ms": round(statistics.median(times), 1),
                       "max_ms": round(max(times), 1), "kb": round(size / 1024, 1), "loads": len(times)},
        "live": {"cards": args.cards, "arrived": len(live),
                 "p50_ms": round(statistics.median(live), 1) if live else None,
                 "max_ms": round(max(live), 1) if live else None},
        "rss_mb": {"console_start": round(started_rss, 1), "console": round(rss, 1),
                   "agent": round(agent_rss, 1)},
        "tls": not args.no_tls,
        "goals": GOALS,
        "machine": machine_info(),
    }
    result["meets"] = {
        "first_page_ms": max(cold_ms, *times) <= GOALS["first_page_ms"],
        "first_page_kb": size / 1024 <= GOALS["first_page_kb"],
        "live_ms": bool(live) and len(live) == args.cards and max(live) <= GOALS["live_ms"],
        "rss_mb": rss <= GOALS["rss_mb"],
    }
    write_result("console", result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k not in ("method", "machine")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
