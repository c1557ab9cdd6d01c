"""A broker flood from its own process: junk messages at a paced rate.

    python -m tests.flooder HOST PORT TOPIC RATE SECONDS [--qos 0] [--size N]

Publishes ``{"junk": n}`` (padded to --size bytes) to TOPIC, RATE messages a
second for SECONDS, then prints how many it sent, as JSON on stdout. Used by
tests/test_flood.py and bench/chaos.py (the field's junk flood, issue 9).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.flooder")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("topic")
    p.add_argument("rate", type=float)
    p.add_argument("seconds", type=float)
    p.add_argument("--qos", type=int, default=0)
    p.add_argument("--size", type=int, default=0, help="pad each message to this many bytes")
    args = p.parse_args(argv)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flooder-{time.monotonic_ns()}",
                         protocol=mqtt.MQTTv5)
    client.max_queued_messages_set(10_000)
    client.connect(args.host, args.port)
    client.loop_start()
    t0 = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - t0) < args.seconds:
        due = int(elapsed * args.rate)
        while sent < due:
            body = json.dumps({"junk": sent})
            if args.size > len(body):
                body = json.dumps({"junk": sent, "pad": "x" * (args.size - len(body) - 10)})
            client.publish(args.topic, body, qos=args.qos)
            sent += 1
        time.sleep(0.001)
    time.sleep(0.5)  # let paho write what it queued
    client.loop_stop()
    client.disconnect()
    print(json.dumps({"sent": sent, "seconds": round(time.monotonic() - t0, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
