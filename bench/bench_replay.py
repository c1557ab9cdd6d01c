"""Replay benchmark: drain a backlog of N pending events from the journal to a
local mosquitto, against plain paho publishing the same payloads.

    .venv/bin/python -m bench.bench_replay [--events N] [--window W]

1. Fill a journal with N pending ``access.granted`` events (``commit`` in
   batches, then one checkpoint, as the sync thread would).
2. Start a local mosquitto (tests/broker.py's launcher) and a subscriber in
   its own process (QoS 0), so the broker answers 0x00 rather than 0x10.
3. ``journal_per_s``: the Uplink in ack mode ``broker`` drains the journal
   (read, publish QoS 1 with an in-flight window of W, ``ack_one`` per PUBACK).
4. ``raw_paho_per_s``: plain paho (its own network thread, ``loop_start``)
   publishes the same payload bytes with QoS 1 and the same window, kept
   full from ``on_publish``.
5. ``ratio`` = journal_per_s / raw_paho_per_s; written under key ``replay``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SITE, GATE = "bench", "gate1"
BATCH = 1000

SUBSCRIBER = r"""
import sys, paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-subscriber", protocol=mqtt.MQTTv5)
c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=0)
c.on_subscribe = lambda *a: print("ready", flush=True)
c.on_message = lambda *a: None
c.connect(host, port)
c.loop_forever()
"""


def record(i: int, boot: str) -> dict:
    from agent.core.events import Now
    from agent.core.records import make_record

    return make_record(
        "access.granted", Now(mono=1000.0 + i * 0.5, wall=1_790_000_000.0 + i * 0.5), boot,
        reader="entry", direction="in", card=(100 << 16) | (i % 65536), format="w26",
        person=f"p-{i % 1300:05d}",
    )


def fill(journal, n: int, boot: str) -> list[bytes]:
    """Commit n records; return their payloads as the uplink publishes them."""
    from agent.uplink.mqtt import _json

    payloads: list[bytes] = []
    for start in range(0, n, BATCH):
        done = journal.commit([record(i, boot) for i in range(start, min(n, start + BATCH))])
        payloads.extend(_json(r) for r in done if r["type"] == "access.granted")
    journal.checkpoint()  # as the service's sync thread would: fsync, fold the WAL in
    return payloads


def drain_uplink(journal, broker, n: int, window: int) -> tuple[float, dict]:
    from agent.uplink.mqtt import Uplink

    alarms: list = []
    up = Uplink(journal, site=SITE, gate=GATE, host=broker.host, port=broker.port,
                ack_mode="broker", window=window, client_id="bench-uplink",
                on_alarm=lambda *a: alarms.append(a))
    t0 = time.perf_counter()
    up.start()
    while up.stats()["acked"] < n:
        time.sleep(0.01)
    took = time.perf_counter() - t0
    stats = up.stats()
    up.stop()
    if alarms:
        print(f"replay: uplink alarms during the drain: {alarms}", file=sys.stderr)
    return took, stats


def drain_raw_paho(broker, payloads: list[bytes], window: int) -> float:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent.contract import topics

    topic = topics(SITE, GATE)["events"]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(window)
    state = {"next": 0, "acked": 0}
    done = threading.Event()
    connected = threading.Event()
    lock = threading.Lock()

    def send_one() -> None:
        with lock:
            i = state["next"]
            if i >= len(payloads):
                return
            state["next"] = i + 1
        client.publish(topic, payloads[i], qos=1)

    def on_connect(cl, userdata, flags, rc, props):
        connected.set()

    def on_publish(cl, userdata, mid, rc, props):
        state["acked"] += 1
        if state["acked"] >= len(payloads):
            done.set()
        else:
            send_one()  # keep the window full, like the uplink

    client.on_connect = on_connect
    client.on_publish = on_publish
    t0 = time.perf_counter()
    client.connect(broker.host, broker.port)
    client.loop_start()
    connected.wait(10)
    for _ in range(window):
        send_one()
    done.wait()
    took = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="pending events (default 1,000,000)")
    parser.add_argument("--window", type=int, default=20, help="in-flight window (default 20)")
    args = parser.parse_args(argv)
    n, window = args.events, args.window

    from agent.uplink.journal import BYTES_PER_EVENT_ESTIMATE, Journal
    from tests.broker import Mosquitto, mosquitto_path

    if mosquitto_path() is None:
        print("replay: mosquitto is not installed (apt-get install mosquitto); skipped", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        capacity = int(n * 1.3) + 1000  # below the 80 % alarm: the backlog is only our events
        journal = Journal(Path(tmp) / "journal.db", capacity_events=capacity,
                          disk_budget_bytes=capacity * BYTES_PER_EVENT_ESTIMATE * 2)
        boot = "bench-boot"
        t0 = time.perf_counter()
        payloads = fill(journal, n, boot)
        fill_s = time.perf_counter() - t0
        n = len(payloads)
        print(f"replay: {n} events journalled in {fill_s:.1f} s ({n / fill_s:,.0f}/s)", flush=True)

        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, broker.host, str(broker.port),
                                f"gate/v1/{SITE}/+/events"], stdout=subprocess.PIPE, text=True)
        try:
            if sub.stdout is None or sub.stdout.readline().strip() != "ready":
                print("replay: the subscriber did not start", file=sys.stderr)
                return 1
            journal_s, stats = drain_uplink(journal, broker, n, window)
            backlog = journal.backlog()
            journal_per_s = n / journal_s
            print(f"replay: uplink drained {n} in {journal_s:.1f} s ({journal_per_s:,.0f}/s), "
                  f"backlog now {backlog}, stats {stats}", flush=True)
            raw_s = drain_raw_paho(broker, payloads, window)
            raw_per_s = n / raw_s
            print(f"replay: plain paho sent {n} in {raw_s:.1f} s ({raw_per_s:,.0f}/s)", flush=True)
        finally:
            sub.terminate()
            sub.wait(5)
            broker.stop()
            journal.close()
        if backlog != 0:
            print(f"replay: {backlog} events still pending after the drain", file=sys.stderr)
            return 1

    result = {
        "events": n,
        "journal_per_s": round(journal_per_s, 1),
        "raw_paho_per_s": round(raw_per_s, 1),
        "ratio": round(journal_per_s / raw_per_s, 3),
        "window": window,
    }
    print(json.dumps({"replay": result}))
    from bench.common import write_result

    write_result("replay", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
