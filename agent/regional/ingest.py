"""The reference ingest: the regional side's end of the events contract.

Subscribes to the events of every gate with an MQTT 5 shared subscription
(``$share/{group}/gate/v1/+/+/events``), so several ingests can run side by
side on one database; stores each event once by ``id``; keeps, per journal,
the highest seq up to which it holds every event; and, only after that is
committed, publishes ``{"journal", "upto"}`` to the gate's ``ack`` topic. A
gate forgets an event only on that ack, so a crash anywhere here loses
nothing: the gate resends.

An id already stored with other content is a conflict (a forged record, or a
gate cloned from an old SD card): both versions are kept, the later one in
``quarantine``, and an ERROR names the journal, seq and gate. Records ahead
of a gap wait in ``held``, unacked and bounded (store.py).

Run it with ``gate-agent ingest --host H --port P --db FILE`` or
``--db-url postgresql://user@dbhost/gates`` (docs/ingest.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import queue
import secrets
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.contract import TOPIC_ROOT, topics
from agent.core.records import rfc3339_ms
from agent.mqttclient import TlsConfig, new_client
from agent.ratelimit import RateLimitFilter
from agent.regional.store import (
    HOLD_HOURS,
    HOLD_MAX,
    MAX_SEQ,
    Row,
    Store,
    Stored,
    StoreError,
    open_store,
)

log = logging.getLogger("agent.ingest")

# After a broker restart the ingest is back within about RECONNECT_MAX_S: while
# it is away the broker answers the gates' events with 0x10 (nobody subscribed)
# and they back off. One client retrying every 2 s costs the broker nothing.
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 2.0
HOUSEKEEPING_S = 60.0  # how often old held records are dropped
# Records that waited in ``held`` and joined the unbroken prefix when a gap filled are
# acknowledged this long after, unless a later batch already did: time for a real
# version still on its way to arrive and be kept in quarantine (docs/ingest.md).
SETTLE_S = 2.0
MAX_HOLD_HOURS = 24 * 366  # a held record waits at most a year, whatever --hold-hours says
LOG_BUDGET = 20  # lines of one message (a conflict, a refusal) per LOG_WINDOW_S; the rest counted
LOG_WINDOW_S = 60.0


def _not_json(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


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
        hold_max: int = HOLD_MAX,
        hold_hours: float = HOLD_HOURS,
    ) -> None:
        self.host, self.port = host, port
        if (db_path is None) == (db_url is None):
            raise ValueError("give the ingest one database: db_path (SQLite file) or db_url "
                             "(postgresql://user@host/db, sqlite:///path or a path)")
        if isinstance(hold_hours, bool) or not (isinstance(hold_hours, int | float)
                                                 and 0 < hold_hours <= MAX_HOLD_HOURS):
            raise ValueError(f"hold_hours (--hold-hours) {hold_hours!r} must be a number of hours above 0 and at "
                             f"most {MAX_HOLD_HOURS} (default {HOLD_HOURS:g})")
        self.hold_hours = float(hold_hours)
        try:
            where = db_url if db_url is not None else Path(db_path)
            self._store: Store = open_store(where, hold_max=hold_max)
        except StoreError as exc:
            raise IngestError(str(exc)) from exc
        # The SQLite file, when that is the store (tests read it from outside).
        self.db_path = getattr(self._store, "path", None)
        self.db_url = self._store.url  # without any password: safe to print
        self.group = group
        self.filter = f"$share/{group}/{TOPIC_ROOT}/+/+/events"
        # Random: two ingests started in the same millisecond had the same id and took
        # each other's connection over, one getting no share of the events.
        self.client_id = client_id or f"ingest-{group}-{secrets.token_hex(6)}"
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._stopping = threading.Event()
        self.received = 0
        self.stored = 0  # entered events (directly, or from held once the gap filled)
        self.held = 0  # put in held, ahead of a gap
        self.duplicates = 0
        self.quarantined = 0  # conflicts: versions of an id stored first with other content
        self.ahead = 0  # refused, beyond the hold bound; not acked, so the gate resends
        self.expired = 0  # held records dropped after hold_hours
        self.rejected = 0
        # The writer thread and a caller of expire_held() share one store connection.
        self._store_lock = threading.Lock()
        self._housekeeping_at = time.monotonic()
        self._settling: dict[str, tuple[str, str, int, float]] = {}  # journal -> (site, gate, upto, due)
        self._acked: dict[str, int] = {}  # journal -> highest ack sent by this ingest

        client = new_client(self.client_id, tls=tls, username=username, password=password)
        client.max_inflight_messages_set(0)
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        self._client = client
        # Set once the broker confirmed the subscription: events sent after it reach us.
        self.ready = threading.Event()
        self._refusal_logged_at: float | None = None

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
            # Retried every RECONNECT_MAX_S: say it once a minute, not 30 times.
            if self._refusal_logged_at is None or time.monotonic() - self._refusal_logged_at >= 60:
                self._refusal_logged_at = time.monotonic()
                log.error("ingest: broker %s:%s refused the connection: %s", self.host, self.port, reason_code)
            return
        self._refusal_logged_at = None
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
            wait = HOUSEKEEPING_S / 4
            if self._settling:
                wait = min(wait, max(0.0, min(d for *_r, d in self._settling.values()) - time.monotonic()))
            try:
                item = self._queue.get(timeout=wait)
            except queue.Empty:
                item = False
            batch = []
            while item:
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
            if self._settling:
                self._ack_settled()
            if time.monotonic() >= self._housekeeping_at:
                self._housekeeping_at = time.monotonic() + HOUSEKEEPING_S
                try:
                    self.expire_held()
                except Exception:
                    log.exception("ingest: unexpected failure dropping old held records; tried again later")
            if item is None:
                return

    def _parse(self, topic: str, payload: bytes) -> Row | None:
        parts = topic.split("/")
        if len(parts) != 5 or parts[4] != "events":
            return None
        site, gate = parts[2], parts[3]
        try:
            body = payload.decode("utf-8")
            # NaN and Infinity are not JSON: PostgreSQL refuses them, which would fail the
            # batch (other gates' events too) every time the record came back.
            rec = json.loads(body, parse_constant=_not_json)
            rid, seq = rec["id"], rec["seq"]
            journal, _, seq_text = rid.rpartition(":")
            if not journal or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ or seq_text != str(seq):
                raise ValueError(f"id {rid!r} does not end in ':{seq}'")
            rtype, ts = rec.get("type"), rec.get("ts")
            rtype = rtype if isinstance(rtype, str) else None
            ts = ts if isinstance(ts, str) else None
            for v in (rid, rtype or "", ts or ""):
                # No SQL text column holds NUL, nor a lone surrogate (a \ud800 escape):
                # such a record could never be stored and would fail its whole batch.
                if "\x00" in v:
                    raise ValueError("a NUL character in id, type or ts")
                v.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("ingest: rejected a message on %s (a lone surrogate escape in id, type or ts)", topic)
            self.rejected += 1
            return None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            log.warning("ingest: rejected a message on %s (%s)", topic, str(exc)[:200])
            self.rejected += 1
            return None
        return Row(rid, journal, seq, site, gate, rtype, ts, body)

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        rows = [r for r in (self._parse(t, p) for t, p in batch) if r is not None]
        if not rows:
            self.received += len(batch)
            return
        with self._store_lock:
            done = self._store.insert(rows)  # returns once committed
        # Counted after the commit, so a caller seeing the count also sees the rows.
        self.stored += done.new
        self.held += done.held
        self.duplicates += done.duplicates
        self.quarantined += len(done.conflicts)
        self.ahead += done.ahead
        self.rejected += done.foreign
        self.received += len(batch)
        self._report(done)
        # Acks only after COMMIT: an ack promises the events are stored.
        for journal, mark in done.marks.items():
            if mark.ack >= 1:
                self._ack(journal, mark.site, mark.gate, mark.ack)
            if mark.upto > max(mark.ack, self._acked.get(journal, 0)):
                # Held records joined the prefix: acknowledged once they have settled.
                due = time.monotonic() + SETTLE_S
                self._settling[journal] = (mark.site, mark.gate, mark.upto, due)

    def _ack(self, journal: str, site: str, gate: str, upto: int) -> None:
        self._client.publish(topics(site, gate)["ack"], json.dumps({"journal": journal, "upto": upto}),
                             qos=1)
        if upto > self._acked.get(journal, 0):
            self._acked[journal] = upto
        if len(self._acked) > 100_000:
            self._acked.clear()  # a cache only: an ack sent again is harmless

    def _ack_settled(self) -> None:
        now = time.monotonic()
        for journal, (site, gate, upto, due) in list(self._settling.items()):
            if due > now:
                continue
            del self._settling[journal]
            if upto > self._acked.get(journal, 0):
                self._ack(journal, site, gate, upto)

    def _report(self, done: Stored) -> None:
        for c in done.conflicts:
            log.error(
                    "ingest: CONFLICT: event %s (journal %s, seq %d) from gate %s/%s differs from the "
                    "version stored first (in %s); both kept, this one in quarantine. A forged record "
                    "or a gate cloned from an old SD card: see docs/ingest.md, \"A stolen certificate\"",
                    c.id, c.journal, c.seq, c.site, c.gate, "this batch" if c.first_in == "batch" else c.first_in)
        for journal, r in done.refused.items():
            log.warning(
                    "ingest: refused %d record(s) of journal %s from gate %s/%s (seqs %d..%d): more than "
                    "%d past its mark %d, or the gate already has that many held; not acknowledged, "
                    "the gate sends them again once the gap before them fills",
                    r.count, journal, r.site, r.gate, r.first_seq, r.last_seq, self._store_hold_max(), r.mark)

    def _store_hold_max(self) -> int:
        return getattr(self._store, "hold_max", HOLD_MAX)

    def expire_held(self, now: float | None = None) -> int:
        """Drop held records older than ``hold_hours`` (the writer does it every minute).

        Safe at any time: a held record was never acked, so a gate that really
        has it sends it again. Returns how many were dropped."""
        before = rfc3339_ms((time.time() if now is None else now) - self.hold_hours * 3600)
        try:
            with self._store_lock:
                gone = self._store.expire_held(before)
        except StoreError as exc:
            log.error("ingest: %s; tried again in %.0f s", exc, HOUSEKEEPING_S)
            return 0
        for e in gone:
            log.warning(
                "ingest: dropped %d held record(s) of journal %s from gate %s/%s (seqs %d..%d): the gap "
                "before them did not fill in %g h. Never acknowledged: a gate that has them sends them "
                "again; records far ahead of a gate's journal are likely forged",
                e.count, e.journal, e.site, e.gate, e.first_seq, e.last_seq, self.hold_hours)
        n = sum(e.count for e in gone)
        self.expired += n
        return n

    # --- reading ----------------------------------------------------------------

    def events(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        """Stored events (each once), ordered by journal then seq: every journal's
        contiguous prefix (records ahead of a gap wait in held)."""
        return self._store.events(site, gate)

    def upto(self, journal: str) -> int:
        """The journal's contiguous mark: every seq up to it is stored."""
        return self._store.upto(journal)

    def conflicts(self, site: str | None = None, gate: str | None = None) -> list[dict]:
        """Quarantined versions, oldest first: each with its ``record``, the ``first``
        version stored under its id and where that is (``first_in``: events or held)."""
        return self._store.conflicts(site, gate)

    def held_count(self, site: str | None = None, gate: str | None = None) -> int:
        """Records now waiting in held (ahead of a gap)."""
        return self._store.held_count(site, gate)

    def stats(self) -> dict:
        return {"received": self.received, "stored": self.stored, "held": self.held,
                "duplicates": self.duplicates, "conflicts": self.quarantined, "ahead": self.ahead,
                "expired": self.expired, "rejected": self.rejected}


def _differences(first: dict | None, record: dict) -> str:
    from agent.i18n import _

    if first is None:
        return _("the first version is no longer held (dropped after waiting for its gap)")
    keys = sorted(set(first) | set(record))
    diffs = [f"{k}: {json.dumps(first.get(k, '(absent)'))} -> {json.dumps(record.get(k, '(absent)'))}"
             for k in keys if first.get(k, ...) != record.get(k, ...)]
    return _("differs (first -> this): ") + "; ".join(diffs) if diffs else _("same content, other spelling")


def list_conflicts(store: Store, site: str | None, gate: str | None, as_json: bool) -> int:
    """Print the quarantine; exit 1 when it holds anything (for a monitoring check).
    The listing is for a person, in their language; --json is data and stays as stored."""
    from agent.i18n import _

    rows = store.conflicts(site, gate)
    for c in rows:
        if as_json:
            print(json.dumps(c, ensure_ascii=False))
        else:
            print(f"{c['received']}  {c['site']}/{c['gate']}  {c['id']}  "
                  f"{_('first in')} {c['first_in'] or '-'}  {_differences(c['first'], c['record'])}")
    if not as_json:
        print(_("{n} conflicting version(s) in quarantine").format(n=len(rows))
              + (_("; see docs/ingest.md, \"A stolen certificate\"") if rows else ""))
    return 1 if rows else 0


def build_parser() -> argparse.ArgumentParser:
    """The ingest's command line, its --help and usage errors in the user's
    language (agent/i18n.py); what the ingest logs while it runs stays English."""
    from agent.i18n import install_argparse, translate_parser

    install_argparse()  # before the parser is built: "options", "show this help" are looked up then
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
    parser.add_argument("--hold", type=int, default=HOLD_MAX, metavar="N",
                        help="records ahead of a gap: at most N held per gate, none more than N past "
                        "its journal's mark (default %(default)s)")
    parser.add_argument("--hold-hours", type=float, default=HOLD_HOURS, metavar="H",
                        help="drop a held record after H hours; the gate resends it (default %(default)g)")
    parser.add_argument("--conflicts", action="store_true",
                        help="list the quarantined versions (conflicts) and exit: 0 none, 1 some")
    parser.add_argument("--site", default=None, help="with --conflicts: only this site")
    parser.add_argument("--gate", default=None, help="with --conflicts: only this gate")
    parser.add_argument("--json", action="store_true", help="with --conflicts: one JSON object a line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the informational lines too (connected, subscribed)")
    return translate_parser(parser)


def _error(exc: BaseException) -> str:
    """A database or connection error for the person at the terminal, in their language
    (the database's or the OS's own words inside it stay as given)."""
    from agent.i18n import _
    from agent.tools.words import ingest_message

    return _("error: {error}").format(error=ingest_message(str(exc)))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # A forger's flood of conflicts: 20 lines of each message a minute, then a count.
    handler.addFilter(RateLimitFilter(LOG_BUDGET, LOG_WINDOW_S))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, handlers=[handler])
    if args.conflicts:
        if args.db is not None and not Path(args.db).is_file():
            from agent.i18n import _

            print(_("error: no ingest database at {path}; give the --db the ingest writes to").format(path=args.db))
            return 2
        try:
            store = open_store(args.db_url if args.db_url is not None else Path(args.db))
            try:
                return list_conflicts(store, args.site, args.gate, args.json)
            finally:
                store.close()
        except StoreError as exc:
            print(_error(exc))
            return 2
    tls = TlsConfig(args.ca_file, args.cert_file, args.key_file) if args.ca_file else None
    try:
        ingest = Ingest(args.host, args.port, db_path=args.db, db_url=args.db_url, group=args.group,
                        client_id=args.client_id, tls=tls, username=args.username,
                        password=args.password, hold_max=args.hold, hold_hours=args.hold_hours)
    except (IngestError, ValueError) as exc:
        print(_error(exc))
        return 2
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    ingest.start()
    from agent.i18n import _

    # What the person at the terminal reads is in their language; the log lines stay English.
    print(_("ingest: {host}:{port} -> {db} (group {group}); Ctrl-C stops").format(
        host=args.host, port=args.port, db=ingest.db_url, group=args.group), flush=True)
    done.wait()
    ingest.stop()
    print(_("ingest: stopped; {stats}").format(stats=ingest.stats()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
