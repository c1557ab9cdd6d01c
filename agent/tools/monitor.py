"""``gate-agent monitor``: a live view of one gate in the terminal.

    gate-agent monitor [--config FILE]                       on the board: the local journal
    gate-agent monitor --broker HOST[:PORT] --site S --gate G [--ca --cert --key]
                                                             the regional server's view over MQTT
    ... [--once] [--lines N] [--plain]

Shows the mode, the broker state, the access list, counters (granted,
denied by reason, passages by direction, forced, timeouts, reader errors,
faults, active alarms) with the period they cover, the backlog to the
server and the last events (a denial's reason first; "clock?" explained
when shown). A service that is not running (systemd, on the board) or an
agent that announced its stop (over MQTT) shows mode "?" and says so.

Sources. On the board the journal is read read-only, as ``gate-agent
journal`` does (the service is never disturbed); the broker state and the
backlog come from the journal and from the service's systemd STATUS= line.
From the regional side the monitor subscribes to the gate's ``events``,
``status`` (retained: online/offline) and ``telemetry`` topics; it needs an
identity the broker lets read them (the regional server's certificate), a
gate's own certificate cannot.

The screen is redrawn with plain ANSI codes once a second (no curses). Not
a terminal, or ``--plain``: new events are printed as lines, with a counter
line every few seconds. ``--once``: one frame, no ANSI, then exit (scripts
and tests); over MQTT it first waits ``--wait`` seconds for the retained
status and what arrives.

Exit codes: 0 done (Ctrl-C is a normal end), 2 the source cannot be read.

Some 620 lines on purpose: one screen (``GateView``, which the demo shows
too) and its two feeds (``MqttSource``, ``JournalSource``), which only call
the view's setters; each part is small and they are only used together.
"""
from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from agent.exits import Exit
from agent.i18n import _
from agent.tools.words import alarm_text, mode_text, reader_error_text, reason_text

from .journaltool import (
    JournalReadError,
    format_record,
    journal_path,
    local_time_text,
    open_readonly,
)

__all__ = [
    "GateView",
    "JournalSource",
    "MqttSource",
    "add_monitor_parser",
    "run_view",
]

EXIT_OK = Exit.OK
EXIT_UNREADABLE = Exit.USAGE
REDRAW_S = 1.0
PLAIN_SUMMARY_S = 10.0
CLEAR = "\x1b[H\x1b[2J"


class GateView:
    """What the monitor shows; fed from any thread (records, status, telemetry)."""

    def __init__(self, site: str = "?", gate: str = "?", lines: int = 12) -> None:
        self.site, self.gate = site, gate
        self.recent: deque[dict] = deque(maxlen=max(1, lines))
        self.lines = lines
        self.counts: Counter[str] = Counter()
        self.denied: Counter[str] = Counter()
        self.passages: Counter[str] = Counter()  # by direction
        self.reader_errors: Counter[str] = Counter()  # by kind
        self.alarms: dict[str, str] = {}  # active alarm kind -> detail
        self.mode = "?"
        self.fire = False
        self.acl_version: str | None = None
        self.gate_state: str | None = None  # online/offline from the retained status
        self.broker: str = "?"  # the monitor's own line to its source
        self.backlog: int | None = None
        self.oldest_pending_s: float | None = None
        self.status_line: str | None = None  # the service's systemd STATUS=
        self.last_seq = 0
        # Messages for the person watching (the demo's): enough that its first ones (the broker's
        # port, the commands to try) stay on screen.
        self.notes: deque[str] = deque(maxlen=12)
        self.since = time.time()
        self.counted_from: float | None = None  # the earliest record counted (epoch s): the counters' period
        self.service_state: str | None = None  # systemd's word for the service (on the board), if known
        self.offline_reason: str | None = None  # the retained offline status' reason (over MQTT)
        self._lock = threading.Lock()
        self._new: list[dict] = []  # records not yet printed (plain mode)

    # -- feeding ------------------------------------------------------------------

    def add_record(self, rec: dict) -> None:
        with self._lock:
            self._count(rec)
            self.recent.append(rec)
            self._new.append(rec)
            seq = rec.get("seq")
            if isinstance(seq, int):
                self.last_seq = max(self.last_seq, seq)

    def _count(self, rec: dict) -> None:
        t = rec.get("type", "?")
        self.counts[t] += 1
        try:
            wall = datetime.fromisoformat(str(rec.get("ts"))).timestamp()
        except ValueError:
            wall = None
        if wall is not None and (self.counted_from is None or wall < self.counted_from):
            self.counted_from = wall
        if t == "access.denied":
            self.denied[str(rec.get("reason"))] += 1
        elif t == "passage":
            self.passages[str(rec.get("direction"))] += 1
        elif t == "reader.error":
            self.reader_errors[str(rec.get("kind"))] += 1
        elif t == "alarm":
            kind = str(rec.get("kind"))
            if rec.get("active"):
                self.alarms[kind] = str(rec.get("detail") or "")
            else:
                self.alarms.pop(kind, None)
        elif t == "alarm.fire":
            self.fire = bool(rec.get("active"))
        elif t == "mode.changed":
            self.mode = str(rec.get("to"))
        elif t == "agent.started":
            self.mode = str(rec.get("mode", self.mode))
            self.acl_version = rec.get("acl_version") or self.acl_version
            self.alarms.clear()
        elif t == "acl.applied":
            self.acl_version = rec.get("version") or self.acl_version

    def set_status(self, doc: dict) -> None:
        with self._lock:
            self.gate_state = str(doc.get("state"))
            self.offline_reason = str(doc.get("reason")) if doc.get("state") == "offline" else None
            if self.offline_reason == "shutdown":
                self.mode = "?"  # an orderly stop: the agent decides nothing until it starts again
            if doc.get("state") == "online" and doc.get("acl_version"):
                self.acl_version = doc.get("acl_version")

    def set_telemetry(self, doc: dict) -> None:
        with self._lock:
            if isinstance(doc.get("backlog"), int):
                self.backlog = doc["backlog"]
            self.oldest_pending_s = doc.get("oldest_pending_s")
            if doc.get("acl_version"):
                self.acl_version = doc["acl_version"]

    def set_backlog(self, backlog: int | None, oldest_s: float | None) -> None:
        with self._lock:
            self.backlog, self.oldest_pending_s = backlog, oldest_s

    def set_broker(self, state: str) -> None:
        with self._lock:
            self.broker = state

    def set_status_line(self, text: str | None) -> None:
        with self._lock:
            self.status_line = text

    def set_service_state(self, state: str | None) -> None:
        """systemd's state of the service (active, inactive, failed, ...), None when unknown.
        A stopped service is in no mode: the mode shows "?" until its agent.started."""
        with self._lock:
            self.service_state = state
            if self.service_stopped():
                self.mode = "?"

    def service_stopped(self) -> bool:
        return self.service_state not in (None, "active", "activating", "reloading")

    def note(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        with self._lock:
            self.notes.append(f"{stamp} {text}")

    def take_new(self) -> list[dict]:
        with self._lock:
            new, self._new = self._new, []
        return new

    # -- showing ------------------------------------------------------------------

    def summary(self) -> dict:
        """The figures as data (the demo's last line, tests)."""
        with self._lock:
            return {
                "granted": self.counts["access.granted"],
                "denied": sum(self.denied.values()),
                "denied_by_reason": dict(self.denied),
                "passages": sum(self.passages.values()),
                "passages_by_direction": dict(self.passages),
                "forced": self.counts["passage.forced"],
                "timeouts": self.counts["passage.timeout"],
                "reader_errors": sum(self.reader_errors.values()),
                "faults": self.counts["turnstile.fault"],
                "alarms": sorted(self.alarms),
                "fire": self.fire,
                "mode": self.mode,
                "events": sum(self.counts.values()),
                "backlog": self.backlog,
            }

    def counter_lines(self) -> list[str]:
        s = self.summary()
        reasons = ", ".join(f"{reason_text(k)} {v}" for k, v in sorted(s["denied_by_reason"].items())) or "-"
        dirs = s["passages_by_direction"]
        with self._lock:
            kinds = ", ".join(f"{reader_error_text(k)} {v}" for k, v in sorted(self.reader_errors.items())) or "-"
            oldest = self.oldest_pending_s
        backlog = "?" if s["backlog"] is None else str(s["backlog"])
        if oldest:
            backlog += _(" (oldest {s} s)").format(s=round(oldest))
        alarms = ", ".join(([_("FIRE")] if s["fire"] else []) + [alarm_text(a) for a in s["alarms"]]) or "-"
        return [
            _("granted {granted}   denied {denied} ({reasons})").format(
                granted=s["granted"], denied=s["denied"], reasons=reasons),
            _("passages {n} (in {i}, out {o})   forced {forced}   not passed {timeouts}").format(
                n=s["passages"], i=dirs.get("in", 0), o=dirs.get("out", 0), forced=s["forced"],
                timeouts=s["timeouts"]),
            _("reader errors {n} ({kinds})   turnstile faults {faults}   alarms: {alarms}").format(
                n=s["reader_errors"], kinds=kinds, faults=s["faults"], alarms=alarms),
            _("backlog to the server: {backlog}").format(backlog=backlog),
        ]

    def render(self, *, now: float | None = None, width: int | None = None,
               height: int | None = None) -> list[str]:
        """The frame: lines no wider than width (longer ones wrapped, never cut, so a denial's
        reason stays readable at 80 columns); with height (a live terminal: its rows when
        width is not given) the oldest events give way so the rest fits."""
        now = time.time() if now is None else now
        if width is None:
            size = shutil.get_terminal_size((100, 30))
            width, height = size.columns, height or size.lines
        with self._lock:
            gate_state = self.gate_state
            head = _("gate {site}/{gate}   mode {mode}   broker {broker}   access list {acl}").format(
                site=self.site, gate=self.gate, mode=mode_text(self.mode).upper() if self.fire else mode_text(self.mode),
                broker=self.broker + (f" ({gate_state})" if gate_state else ""), acl=self.acl_version or "-")
            status = self.status_line
            recent = list(self.recent)
            notes = list(self.notes)
        clock = datetime.fromtimestamp(now).strftime("%H:%M:%S")
        lines = [f"{head}   {clock}"]
        if status:
            lines.append(_("service: {status}").format(status=status))
        lines.extend(self._state_lines())
        lines.extend(f"* {n}" for n in notes)
        lines.append(self.period_line(now))
        lines.extend(self.counter_lines())
        lines.append(_("--- last events ---"))
        shown = [format_record(r, date=False) for r in recent[-self.lines:]]
        legend = []
        if any(r.get("clock_synced") is False for r in recent[-self.lines:]):
            legend.append(_("clock?: made while the gate's clock was not synchronised: its time may be wrong"))
        return _fit(lines, shown, legend, width, height)

    def _state_lines(self) -> list[str]:
        with self._lock:
            state, reason = self.service_state, self.offline_reason
            stopped = self.service_stopped()
        if stopped:
            return [_("! the service is not running (systemd: {state}): the gate decides nothing; "
                      "sudo systemctl start gate-agent").format(state=state)]
        if reason == "shutdown":
            return [_("! the agent has stopped (an orderly shutdown): the gate decides nothing until it starts")]
        if reason is not None:
            return [_("! the gate is offline (its connection was lost): it still decides and keeps its "
                      "events; they come when it reconnects; the mode shown is the last one seen")]
        return []

    def period_line(self, now: float | None = None) -> str:
        """What the counters cover: from the earliest record counted (or the view's start)."""
        now = time.time() if now is None else now
        with self._lock:
            start = self.since if self.counted_from is None else min(self.since, self.counted_from)
            n = sum(self.counts.values())
        begin = datetime.fromtimestamp(start).astimezone()
        today = datetime.fromtimestamp(now).astimezone().date() == begin.date()
        shown = local_time_text(begin, date=not today) if not today else begin.strftime("%H:%M:%S")
        return _("counters: since {since}, events counted: {n}").format(since=shown, n=n)


def _wrap(line: str, width: int) -> list[str]:
    if len(line) <= width or width < 20:
        return [line[:width]] if width < 20 else [line]
    return textwrap.wrap(line, width=width, subsequent_indent="    ", break_long_words=True,
                         break_on_hyphens=False) or [""]


def _fit(lines: list[str], events: list[str], legend: list[str], width: int, height: int | None) -> list[str]:
    head = [part for line in lines for part in _wrap(line, width)]
    tail = [part for line in legend for part in _wrap(line, width)]
    # An event keeps one row: its reason comes first (format_record), so only the reader and
    # card details at its end may give way, marked with "…".
    wrapped = [[e if len(e) <= width else e[:max(0, width - 1)] + "…"] for e in events]
    if height is not None:
        room = max(0, height - 1 - len(head) - len(tail))  # one row for the cursor's line
        kept: list[list[str]] = []
        for e in reversed(wrapped):  # the newest events first
            if sum(len(k) for k in kept) + len(e) > room:
                break
            kept.append(e)
        wrapped = list(reversed(kept))
    return head + [part for e in wrapped for part in e] + tail


# --------------------------------------------------------------------------- sources


class MqttSource:
    """The gate's events, status and telemetry from the broker (the regional view)."""

    def __init__(self, view: GateView, host: str, port: int, *, site: str, gate: str, tls: Any = None,
                 username: str | None = None, password: str | None = None) -> None:
        from agent.contract import topics
        from agent.mqttclient import new_client

        self.view = view
        self.topics = topics(site, gate)
        self.ready = threading.Event()
        self.error: str | None = None
        client = new_client(f"monitor-{site}-{gate}-{time.time_ns() % 10**9}", tls=tls, username=username,
                            password=password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: self.ready.set()
        client.reconnect_delay_set(1, 10)
        self.client = client
        self.host, self.port = host, port

    def start(self) -> MqttSource:
        self.view.set_broker(_("connecting"))
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.error = str(reason_code)
            self.view.set_broker(_("refused ({reason})").format(reason=reason_code))
            return
        self.view.set_broker(_("connected"))
        client.subscribe([(self.topics[t], 1) for t in ("events", "status", "telemetry")])

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.view.set_broker(_("disconnected"))

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if message.topic == self.topics["events"]:
            self.view.add_record(doc)
        elif message.topic == self.topics["status"]:
            self.view.set_status(doc)
        elif message.topic == self.topics["telemetry"]:
            self.view.set_telemetry(doc)


def service_active_state() -> str | None:
    """systemd's word for the service (active, inactive, failed, ...); None without systemd."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return None
    try:
        res = subprocess.run(["systemctl", "is-active", "gate-agent"], capture_output=True, text=True,
                             timeout=3, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


def service_status_text() -> str | None:
    """The running service's systemd STATUS= line (mode, backlog, broker, acl), if any."""
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return None
    try:
        res = subprocess.run(["systemctl", "show", "gate-agent", "-p", "StatusText", "--value"],
                             capture_output=True, text=True, timeout=3, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None


class JournalSource:
    """The local journal, read-only, polled for new records (the board's view)."""

    def __init__(self, view: GateView, path: str | Path, *, poll_s: float = 0.5, history: int | None = None,
                 status_text: Callable[[], str | None] = service_status_text,
                 service_state: Callable[[], str | None] = service_active_state) -> None:
        self.view = view
        self._service_state = service_state
        self.path = Path(path)
        self.poll_s = poll_s
        self.history = history  # records read at start (None: today's, for the counters)
        self._status_text = status_text
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: Any = None
        self.error: str | None = None

    def load(self) -> None:
        """Open the journal and read the records the counters start from; JournalReadError."""
        from .journaltool import read_records

        self._conn = open_readonly(self.path)
        self.view.set_broker(_("journal view"))
        if self.history is None:
            midnight = datetime.now().astimezone().replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
            row = self._conn.execute("SELECT coalesce(min(seq), 0) FROM events WHERE wall >= ?", (midnight,)).fetchone()
            start = max(0, row[0] - 1) if row[0] else self._top()
        else:
            start = max(0, self._top() - self.history)
        for rec in read_records(self._conn, since_seq=start):
            self.view.add_record(rec)
        self.view.take_new()  # history is shown in the frame, not printed again as new
        self.poll_once()

    def _top(self) -> int:
        return self._conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]

    def poll_once(self) -> None:
        from .journaltool import read_records

        if self._conn is None:
            self._conn = open_readonly(self.path)
        for rec in read_records(self._conn, since_seq=self.view.last_seq):
            self.view.add_record(rec)
        pending, oldest = self._conn.execute("SELECT count(*), min(wall) FROM events WHERE done IS NULL").fetchone()
        self.view.set_backlog(pending, None if oldest is None else max(0.0, time.time() - oldest))
        self.view.set_status_line(self._status_text())
        self.view.set_service_state(self._service_state())

    def start(self) -> JournalSource:
        self._thread = threading.Thread(target=self._loop, name="monitor-journal", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll_once()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - a rebuilt or busy journal: open it again next time
                self.error = str(exc)
                self.view.set_broker(_("journal unreadable: {error}").format(error=exc))
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except Exception:  # noqa: BLE001, S110
                        pass
                self._conn = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------- the loop


def run_view(view: GateView, out: TextIO, *, stop: threading.Event, live: bool,
             duration_s: float | None = None, redraw_s: float = REDRAW_S,
             plain_summary_s: float = PLAIN_SUMMARY_S) -> None:
    """Show the view until ``stop`` is set (or ``duration_s`` passed).

    live: redraw the whole screen each time (a terminal); else print new
    events as lines and the counters every ``plain_summary_s``.
    """
    end = None if duration_s is None else time.monotonic() + duration_s
    next_summary = time.monotonic() + plain_summary_s
    while True:
        if live:
            out.write(CLEAR + "\n".join(view.render()) + "\n")
        else:
            out.writelines(format_record(rec, date=False) + "\n" for rec in view.take_new())
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + plain_summary_s
                out.write("== " + " | ".join([view.period_line(), *view.counter_lines()]) + "\n")
        out.flush()
        wait = redraw_s
        if end is not None:
            wait = min(wait, max(0.0, end - time.monotonic()))
        if stop.wait(wait) or (end is not None and time.monotonic() >= end):
            return


def _cmd_monitor(args: argparse.Namespace) -> int:
    prog = "gate-agent monitor"
    out = sys.stdout
    source: Any
    if args.broker:
        from agent.tools.provision import ProvisionError, parse_broker

        if not (args.site and args.gate):
            print(f"{prog}: " + _("--broker needs --site and --gate (which gate to watch)"), file=sys.stderr)
            return EXIT_UNREADABLE
        try:
            host, port = parse_broker(args.broker)
        except ProvisionError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_UNREADABLE
        tls = None
        if args.ca:
            from agent.mqttclient import TlsConfig

            tls = TlsConfig(args.ca, args.cert, args.key)
        port = port or (8883 if tls else 1883)
        view = GateView(args.site, args.gate, lines=args.lines)
        try:
            source = MqttSource(view, host, port, site=args.site, gate=args.gate, tls=tls,
                                username=args.username, password=args.password).start()
        except Exception as exc:  # noqa: BLE001 - bad names, TLS files
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_UNREADABLE
        if args.once:
            time.sleep(args.wait)
    else:
        try:
            path = journal_path(args.config, args.db)
            site, gate = _site_gate(args.config)
            view = GateView(args.site or site, args.gate or gate, lines=args.lines)
            # A journal file given by --db may come from another board: this machine's service says nothing of it.
            source = JournalSource(view, path, **({"service_state": lambda: None} if args.db else {}))
            source.load()
        except JournalReadError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return EXIT_UNREADABLE
        if not args.once:
            source.start()
    try:
        if args.once:
            print("\n".join(view.render(width=None if out.isatty() else 10**6)), file=out)
            return EXIT_OK
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *a: stop.set())
        try:
            run_view(view, out, stop=stop, live=out.isatty() and not args.plain)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
        return EXIT_OK
    finally:
        source.stop()


def _site_gate(config: str | None) -> tuple[str, str]:
    import tomllib

    path = Path(config) if config else Path("/etc/gate-agent/agent.toml")
    try:
        site = tomllib.loads(path.read_text(encoding="utf-8")).get("site", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return "?", "?"
    return str(site.get("id", "?")), str(site.get("gate", "?"))


def add_monitor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``monitor`` (func: args -> exit code) to a ``gate-agent`` subparsers object."""
    p = subparsers.add_parser(
        "monitor",
        help=_("a live view of the gate: last events, counters, backlog, broker"),
        description=_("A live view of one gate. On the board it reads the local journal (read-only; run with "
                      "sudo); with --broker it watches the gate's topics as the regional server sees them. "
                      "Ctrl-C ends it."),
    )
    p.add_argument("--config", default=None, metavar="FILE",
                   help=_("config file: its journal is read (default /etc/gate-agent/agent.toml)"))
    p.add_argument("--db", default=None, metavar="FILE", help=_("the journal file itself"))
    p.add_argument("--broker", metavar="HOST[:PORT]", help=_("watch over MQTT instead of the local journal"))
    p.add_argument("--site", help=_("the gate's site (with --broker)"))
    p.add_argument("--gate", help=_("the gate's id (with --broker)"))
    p.add_argument("--ca", metavar="FILE", help=_("CA file: connect with TLS"))
    p.add_argument("--cert", metavar="FILE", help=_("client certificate allowed to read the gate's topics"))
    p.add_argument("--key", metavar="FILE", help=_("its private key"))
    p.add_argument("--username")
    p.add_argument("--password")
    p.add_argument("--lines", type=int, default=12, metavar="N", help=_("how many last events to show (default 12)"))
    p.add_argument("--once", action="store_true", help=_("print one view and exit"))
    p.add_argument("--wait", type=float, default=3.0, metavar="S",
                   help=_("with --once over MQTT: seconds to collect first (default 3)"))
    p.add_argument("--plain", action="store_true", help=_("no screen redraw: print events as lines"))
    p.set_defaults(func=_cmd_monitor)
    return p
