"""The reference ingest: the regional side's end of the events contract.

Subscribes to the events of every gate with an MQTT 5 shared subscription
(``$share/{group}/gate/v1/+/+/events``), so several ingests can run side by
side on one database; stores each event once by ``id`` (SQLite,
``INSERT OR IGNORE``); keeps, per journal, the highest seq up to which it
holds every event; and, only after that is committed, publishes
``{"journal", "upto"}`` to the gate's ``ack`` topic. A gate forgets an event
only on that ack, so a crash anywhere here loses nothing: the gate resends.

Run it with ``gate-agent ingest --host H --port P --db FILE`` or
``--db-url postgresql://user@dbhost/gates`` (docs/ingest.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.contract import TOPIC_ROOT, topics

from .ingest_store import MAX_SEQ, Row, Store, StoreError, open_store
from .mqtt import TlsConfig

log = logging.getLogger("agent.ingest")

class IngestError(RuntimeError):
    """The ingest cannot run (database or broker settings)."""


class Ingest:
    """Stores every gate's events once and acknowledges them to the gate.

    ``start()`` connects (paho's own network thread) and starts the writer
    thread; ``stop()`` ends both. Messages are written in batches: the writer
    takes whatever has arrived, inserts it in one transaction, commits, then
    publishes one ack per journal touched.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        db_path: str | Path | None = None,
        db_url: str | None = None,
        group: str = "ingest",
        client_id: str | None = None,
        tls: TlsConfig | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.host, self.port = host, port
        if (db_path is None) == (db_url is None):
            raise ValueError("give the ingest one database: db_path (SQLite file) or db_url "
                             "(postgresql://user@host/db, sqlite:///path or a path)")
        try:
            self._store: Store = open_store(db_url if db_url is not None else Path(db_path))
        except StoreError as exc:
            raise IngestError(str(exc)) from exc
        # The SQLite file, when that is the store (tests read it from outside).
        self.db_path = getattr(self._store, "path", None)
        self.db_url = self._store.url  # without any password: safe to print
        self.group = group
        self.filter = f"$share/{group}/{TOPIC_ROOT}/+/+/events"
        self.client_id = client_id or f"ingest-{group}-{int(time.time() * 1000) % 10**9}"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._stopping = threading.Event()
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.rejected = 0

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(0)
        client.reconnect_delay_set(1, 30)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            client.tls_set_context(tls.context())
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self._client = client
        # Set once the broker confirmed the subscription: events sent after it reach us.
        self.ready = threading.Event()

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> Ingest:
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=True)
        self._client.loop_start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._queue.put(None)  # the writer stores and acks what arrived, then ends
        if self._writer is not None:
            self._writer.join(10)
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()
        self._store.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- MQTT (paho's thread) ------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("ingest: broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        client.subscribe(self.filter, options=SubscribeOptions(qos=1))
        log.info("ingest: connected to %s:%s, subscribing to %s", self.host, self.port, self.filter)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("ingest: the broker refused the subscription %s: %s; check its ACL",
                      self.filter, [str(rc) for rc in reason_codes])
            return
        self.ready.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.ready.clear()
        if not self._stopping.is_set():
            log.warning("ingest: disconnected from %s:%s (%s); paho reconnects", self.host, self.port, reason_code)

    def _on_message(self, client, userdata, message) -> None:
        # Only hand over: the writer thread does the SQL, so paho keeps reading.
        self._queue.put((message.topic, message.payload))

    # --- storing (writer thread) ---------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            while item is not None:
                batch.append(item)
                if len(batch) >= 2000:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = False
                    break
            if batch:
                try:
                    self._write(batch)
                except StoreError as exc:
                    # Not acked, so the gates resend; the message says why.
                    log.error("ingest: %s; events not acknowledged, the gates will resend them", exc)
                except Exception:
                    # Whatever it was, the writer must live on: a dead writer acks nothing ever again.
                    log.exception("ingest: unexpected failure storing a batch; not acknowledged")
            if item is None:
                return

    def _parse(self, topic: str, payload: bytes) -> Row | None:
        parts = topic.split("/")
        if len(parts) != 5 or parts[4] != "events":
            return None
        site, gate = parts[2], parts[3]
        try:
            body = payload.decode("utf-8")
            rec = json.loads(body)
            rid, seq = rec["id"], rec["seq"]
            journal, _, seq_text = rid.rpartition(":")
            if not journal or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ or seq_text != str(seq):
                raise ValueError(f"id {rid!r} does not end in ':{seq}'")
            rtype, ts = rec.get("type"), rec.get("ts")
            rtype = rtype if isinstance(rtype, str) else None
            ts = ts if isinstance(ts, str) else None
            # No SQL text column holds NUL: such a record could never be stored.
            if any("\x00" in v for v in (rid, rtype or "", ts or "")):
                raise ValueError("a NUL character in id, type or ts")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ingest: rejected a message on %s (%s)", topic, exc)
            self.rejected += 1
            return None
        return Row(rid, journal, seq, site, gate, rtype, ts, body)

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        rows = [r for r in (self._parse(t, p) for t, p in batch) if r is not None]
        if not rows:
            self.received += len(batch)
            return
        done = self._store.insert(rows)  # returns once committed
        # Counted after the commit, so a caller seeing the count also sees the rows.
        self.stored += done.new
        self.rejected += done.foreign
        self.duplicates += len(rows) - done.new - done.foreign
        self.received += len(batch)
        # Acks only after COMMIT: an ack promises the events are stored.
        for journal, mark in done.marks.items():
            if mark.upto >= 1:
                self._client.publish(
                    topics(mark.site, mark.gate)["ack"],
                    json.dumps({"journal": journal, "upto": mark.upto}), qos=1,
                )

    # --- reading ----------------------------------------------------------------

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        """Stored events (each once), ordered by journal then seq."""
        return self._store.events(site, gate)

    def upto(self, journal: str) -> int:
        """The journal's contiguous mark: every seq up to it is stored."""
        return self._store.upto(journal)

    def stats(self) -> dict:
        return {"received": self.received, "stored": self.stored,
                "duplicates": self.duplicates, "rejected": self.rejected}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gate-agent ingest",
        description="Reference ingest: store every gate's events once and acknowledge them.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="MQTT broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="MQTT broker port (default 1883)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite database file (created if missing)")
    where.add_argument("--db-url", help="database URL: postgresql://user@host/db (PostgreSQL; "
                       "password in ~/.pgpass or PGPASSWORD), sqlite:///path, or a path")
    parser.add_argument("--group", default="ingest", help="shared-subscription group (default ingest)")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--ca-file", default=None, help="CA file: connect with TLS")
    parser.add_argument("--cert-file", default=None)
    parser.add_argument("--key-file", default=None)
    parser.add_argument("--username", default=None)
    parser.add_argument("--password", default=None)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = TlsConfig(args.ca_file, args.cert_file, args.key_file) if args.ca_file else None
    try:
        ingest = Ingest(args.host, args.port, db_path=args.db, db_url=args.db_url, group=args.group,
                        client_id=args.client_id, tls=tls, username=args.username,
                        password=args.password)
    except (IngestError, ValueError) as exc:
        print(f"error: {exc}")
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    ingest.start()
    print(f"ingest: {args.host}:{args.port} -> {ingest.db_url} (group {args.group}); Ctrl-C stops")
    done.wait()
    ingest.stop()
    print(f"ingest: stopped; {ingest.stats()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
