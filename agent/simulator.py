"""The scenario simulator: a school morning in virtual time.

A scenario (TOML, docs/scenarios.md) holds the gate's config, the access
list, a start time and timed stimuli. The simulator feeds them through the
real frame decoders, the fastpath and the turnstile state machine, in virtual
time, and yields the event records (numbered like the journal numbers them)
and, with ``trace_io``, a line for every output change.

It owns the clock (virtual) and the only "I/O" is reading the scenario and
its access-list files, so the same run gives the same records every time.

Some 680 lines: a scenario's checks (schema, then meaning, each problem with
its step and line), its run, and its expectations (counts and sequences),
which share the scenario's notion of a step. Several gates of one site and
the link between them are agent/simsite.py's (a scenario with ``[[gates]]``).
"""
from __future__ import annotations

import heapq
import itertools
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, Self

import fastpath
from agent import __version__
from agent.core import events as ev
from agent.core import schemas
from agent.core.acl import AccessList, AclRejected, build_table
from agent.core.cards import CardFormatError, decode_wiegand, parse_card_string
from agent.core.gateconfig import GateConfig, GateConfigError
from agent.core.problems import ProblemsError
from agent.core.records import SequenceSink, rfc3339_ms
from agent.core.serialframes import EmLineStream, Rdm6300Stream, RepeatFilter
from agent.core.turnstile import Gate

MONO_START = 1000.0  # virtual monotonic seconds at the scenario's start
# The serial adapter's defaults (agent/hw/serial_reader.py, agent.toml's repeat_window_s):
# a serial step goes through the same repeat filter, so a held card is one read here too.
REPEAT_WINDOW_S = 1.5
SERIAL_QUIET_S = 0.1  # SerialReader's read_timeout_s: a torn RDM6300 frame is garbage after this silence
MAX_HOLD_FRAMES = 10_000  # a step's hold: more is a typo, and would fill memory
# Keys of an [[expect]] entry (and of a sequence's items) that are not record fields.
EXPECT_KEYS = ("count", "min", "note", "sequence")
LINK_DELAY_S = 0.05  # a site scenario's link: a record reaches the sibling gates this much later


class ScenarioError(ProblemsError):
    """A scenario that cannot run; the message lists every problem with where it is."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        super().__init__(f"{source}: invalid scenario ({len(problems)} problem(s)):", problems)


def _path(parts) -> str:
    return "/" + "/".join(str(p) for p in parts)


def table_lines(text: str, table: str) -> list[int]:
    """1-based line of each ``[[table]]`` header in a TOML text, in order (an entry written
    in an inline array has none)."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.split("#", 1)[0].replace(" ", "").strip() == f"[[{table}]]":
            out.append(n)
    return out


class _Where:
    """Names a place in a scenario for a person: "step 3 (line 14), card" rather than the
    0-based "/steps/2/card", with the line of the key (else of the step's header) when the
    scenario came from a TOML file written with [[steps]] tables."""

    _NAMES: ClassVar[dict[str, str]] = {"steps": "step", "expect": "expect"}

    def __init__(self, text: str | None = None, doc: dict | None = None):
        self.lines = text.splitlines() if text else []
        self.heads: dict[str, list[int]] = {}
        for table in self._NAMES:
            heads = table_lines(text, table) if text else []
            entries = (doc or {}).get(table)
            # Trusted only when every entry has its header (none written as an inline array).
            self.heads[table] = heads if isinstance(entries, list) and len(heads) == len(entries) else []

    def line(self, table: str, i: int, key: str | None = None) -> int | None:
        heads = self.heads.get(table, [])
        if i >= len(heads):
            return None
        first = heads[i]
        if key:
            for n in range(first, len(self.lines)):  # self.lines[n] is line n + 1
                if self.lines[n].lstrip().startswith("["):
                    break  # the next table: the key is not written here
                if self.lines[n].split("=", 1)[0].strip().strip('"') == key:
                    return n + 1
        return first

    def __call__(self, parts) -> str:
        parts = list(parts)
        if len(parts) >= 2 and parts[0] in self._NAMES and isinstance(parts[1], int):
            table, i, rest = parts[0], parts[1], [str(p) for p in parts[2:]]
            line = self.line(table, i, rest[0] if rest else None)
            head = f"{self._NAMES[table]} {i + 1}" + (f" (line {line})" if line else "")
            return head + (f", {'/'.join(rest)}" if rest else "")
        return _path(parts)


@dataclass
class Scenario:
    name: str
    source: str
    start: datetime
    config: GateConfig
    acl: AccessList | None
    steps: list[dict]  # each with "t" (seconds from start) and "_step"; in order but for a hold's repeats
    expect: list[dict] = field(default_factory=list)
    clock_synced: bool = True
    state: dict | None = None
    expect_lines: list[int | None] = field(default_factory=list)  # 1-based, where the TOML has them
    repeat_window_s: float = REPEAT_WINDOW_S  # the serial readers' repeat filter
    # A site scenario's gates (agent.simsite.SiteGate), each its own Gate; none: one gate, `config`.
    gates: list = field(default_factory=list)
    link_delay_s: float = LINK_DELAY_S


def _load_acl_doc(value: Any, base: Path, where: str, problems: list[str]) -> dict | None:
    if isinstance(value, dict):
        return value
    path = (base / value).resolve()
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        problems.append(f"{where}: access-list file {path} not found")
    except json.JSONDecodeError as exc:
        problems.append(f"{where}: {path} is not valid JSON: {exc}")
    return None


def _parse_at(at: str, start: datetime, prev_t: float) -> float:
    """Seconds from the start for a step's `at`."""
    if at.startswith("+"):
        return prev_t + float(at[1:])
    if "T" in at:
        return (datetime.fromisoformat(at) - start).total_seconds()
    parts = at.split(":")
    h, m = int(parts[0]), int(parts[1])
    s = float(parts[2]) if len(parts) > 2 else 0.0
    day = start.replace(hour=0, minute=0, second=0, microsecond=0)
    return (day + timedelta(hours=h, minutes=m, seconds=s) - start).total_seconds()


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario; raise ScenarioError naming every problem."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
        doc = tomllib.loads(text)
    except FileNotFoundError:
        raise ScenarioError(source, [f"file not found: {path}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(source, [f"not valid TOML: {exc}"]) from None
    return scenario_from_dict(doc, source=source, base=path.parent, text=text)


def scenario_from_dict(doc: dict, *, source: str = "<scenario>", base: Path = Path("."),
                       text: str | None = None) -> Scenario:
    """Check a scenario document; ScenarioError lists every problem, the schema's and the
    meaning's together. text: the TOML source, for line numbers in the messages."""
    where_is = _Where(text, doc)
    schema_errors = list(schemas.validator("scenario").iter_errors(doc))
    # The words of agent/core/schemas.py, at the step and line a person finds in the file.
    problems = [f"{where_is(p.parts)}: {p.message}"
                for p in (schemas.problem(e, "scenario", doc=doc) for e in schema_errors)]
    # A part the schema faults is not checked for meaning (its shape is unknown); every
    # other part is, so one schema error does not hide the rest.
    bad = {tuple(e.instance_path[:n]) for e in schema_errors for n in (1, 2)}
    doc = dict(doc)
    if not isinstance(doc.get("steps"), list):
        doc["steps"] = []
    if ("start",) in bad or not isinstance(doc.get("start"), str):
        doc["start"] = "2026-09-01T07:30:00+00:00"
    if ("gate",) in bad or not isinstance(doc.get("gate", {}), dict):
        doc["gate"] = {}
    if ("acl",) in bad:
        doc.pop("acl", None)
    if not isinstance(doc.get("expect", []), list):
        doc["expect"] = []  # each entry the schema faults is left out below

    try:
        start = datetime.fromisoformat(doc["start"])
        if start.tzinfo is None:
            problems.append("/start: needs a UTC offset, e.g. 2026-09-01T07:30:00+07:00")
    except ValueError:
        problems.append(f"/start: {doc['start']!r} is not an RFC 3339 date-time")
        start = datetime.fromisoformat("2026-09-01T07:30:00+00:00")

    gate_fields = dict(doc.get("gate", {}))
    known = {f.name for f in fields(GateConfig)}
    for k in sorted(set(gate_fields) - known):
        problems.append(f"/gate/{k}: unknown setting; allowed: {', '.join(sorted(known))}")
        gate_fields.pop(k)
    config = None
    try:
        config = GateConfig(**gate_fields)
    except (GateConfigError, TypeError, ValueError) as exc:
        problems.append(f"/gate: {exc}")

    gates = []
    site = isinstance(doc.get("gates"), list)  # several gates, though the schema faulted some
    if site:
        from agent.simsite import site_gates

        gates = site_gates(doc["gates"], gate_fields, where_is, problems,
                           skip={i for i in range(len(doc["gates"])) if ("gates", i) in bad})
    # Every gate declared, also one whose settings are wrong (said above): steps may name it.
    gate_names = list(dict.fromkeys(e["name"] for i, e in enumerate(doc["gates"])
                                    if ("gates", i) not in bad)) if site else []

    acl = None
    if "acl" in doc:
        acl_doc = _load_acl_doc(doc["acl"], base, "/acl", problems)
        if acl_doc is not None:
            try:
                acl = AccessList.from_snapshot(acl_doc)
            except AclRejected as exc:
                problems.extend(f"/acl{e.path}: {e.message}" for e in exc.errors[:20])
    key_width = acl.key_width if acl else 24
    readers = dict(config.readers) if config else {}

    steps: list[dict] = []
    t = 0.0
    for i, step in enumerate(doc["steps"]):
        if ("steps", i) in bad:
            continue  # the schema has said what is wrong with this step

        def where(sub: str, i: int = i) -> str:
            return where_is(["steps", i, *sub.split("/")])

        try:
            t_new = _parse_at(step["at"], start, t)
        except (ValueError, TypeError) as exc:  # TypeError: one of start and at has no UTC offset
            problems.append(f"{where('at')}: {exc}")
            continue
        if t_new < t:
            problems.append(f"{where('at')}: {step['at']} is before the previous step; steps run in time order")
        t = max(t, t_new)
        reader = step.get("reader")
        if site:
            # A step with no `gate` is the first gate's.
            step = {**step, "gate": step.get("gate", gate_names[0] if gate_names else None)}
            if gate_names and step["gate"] not in gate_names:
                problems.append(f"{where('gate')}: {step['gate']!r} is not a gate of [[gates]]: {gate_names}")
            readers = dict(next((g.config.readers for g in gates if g.name == step["gate"]),
                                config.readers if config else {}))
            if "link" in step and set(step) - {"at", "note", "gate", "link"}:
                problems.append(f"{where('link')}: a link change goes on a step of its own (with at, gate, note)")
        elif "gate" in step or "link" in step:
            key = "gate" if "gate" in step else "link"
            problems.append(f"{where(key)}: {key} is for a scenario with several gates; declare them "
                            f"with [[gates]] (docs/scenarios.md)")
        needs_reader = any(k in step for k in ("card", "wiegand", "serial", "osdp")) or "rush" in step
        if "rush" in step:
            reader = step["rush"].get("reader", reader)
        if needs_reader:
            reader = reader or next(iter(readers), None)
            if reader not in readers:
                problems.append(f"{where('reader')}: {reader!r} is not a reader of the gate; readers: {sorted(readers)}")
        cards = [step["card"]] if "card" in step else step.get("rush", {}).get("cards", [])
        for j, c in enumerate(cards):
            try:
                parse_card_string(c, key_width)
            except CardFormatError as exc:
                sub = "card" if "card" in step else f"rush/cards/{j}"
                problems.append(f"{where(sub)}: {exc}")
        if "serial" in step and "protocol" not in step:
            problems.append(f"{where('protocol')}: a serial step needs protocol = \"rdm6300\" or \"emline\"")
        hold = step.get("hold")
        if hold and "serial" not in step:
            problems.append(f"{where('hold')}: hold is for a serial step (a card left in a serial reader's field)")
            hold = None
        elif hold and not hold["for"] / hold["every"] <= MAX_HOLD_FRAMES:  # `not <=`: a NaN too
            problems.append(f"{where('hold')}: {step['hold']['for']} s every {step['hold']['every']} s is over "
                            f"{MAX_HOLD_FRAMES} frames; send them less often (a larger every)")
            hold = None  # not expanded: it would fill memory
        if "osdp" in step:
            fmt = step.get("osdp_format", "wiegand")
            if fmt != "ascii" and not set(step["osdp"]) <= {"0", "1"}:
                problems.append(f"{where('osdp')}: {step['osdp']!r} is not bits (0 and 1); "
                                f"osdp_format = \"{fmt}\" takes the card's bits, \"ascii\" its number as text")
        elif "osdp_format" in step:
            problems.append(f"{where('osdp_format')}: osdp_format goes with an osdp step; add osdp = \"...\"")
        for key in ("acl_delta", "acl_snapshot"):
            if key in step:
                loaded = _load_acl_doc(step[key], base, where(key), problems)
                step = {**step, key: loaded}
        # "_step": the step's number (from 1, as the messages count) on everything it becomes.
        if "rush" in step:
            r = step["rush"]
            for j, c in enumerate(r["cards"]):
                steps.append({"t": t + j * r["every"], "card": c, "reader": reader, "walk": r.get("walk"),
                              "gate": step.get("gate"), "_step": i + 1})
            t += (len(r["cards"]) - 1) * r["every"]
            continue
        if hold:
            # The card stays in the field: the reader sends the same bytes again every `every`
            # seconds until `for` has passed. The next step's "+" still counts from this step's
            # time (a pass while the card is still held is the usual case).
            steps.append({**step, "t": t, "reader": reader, "_step": i + 1})
            n = 1
            while n * hold["every"] <= hold["for"] + 1e-9:
                steps.append({"t": t + n * hold["every"], "serial": step["serial"], "protocol": step["protocol"],
                              "reader": reader, "gate": step.get("gate"), "_step": i + 1})
                n += 1
            continue
        steps.append({**step, "t": t, "reader": reader, "_step": i + 1})

    n_steps = len(doc["steps"])
    for i, exp in enumerate(doc.get("expect", [])):
        if ("expect", i) in bad or not isinstance(exp, dict):
            continue
        if "sequence" in exp:
            others = sorted(set(exp) - {"sequence", "note"})
            if others:
                problems.append(f"{where_is(['expect', i])}: a sequence entry holds only sequence (and note); "
                                f"move {', '.join(others)} into its items")
            items = [(["expect", i, "sequence", j], item) for j, item in enumerate(exp["sequence"])
                     if isinstance(item, dict)]
            for parts, item in items:
                for key in sorted(set(item) & {"count", "min", "sequence"}):
                    problems.append(f"{where_is([*parts, key])}: {key} goes on a whole [[expect]] entry; "
                                    f"a sequence item is one record")
        else:
            items = [(["expect", i], exp)]
        names = gate_names if site else [config.gate] if config else []
        for parts, item in items:
            g = item.get("gate")
            if g is not None and (names or not site) and g not in names:
                problems.append(f"{where_is([*parts, 'gate'])}: {g!r} is not a gate of the scenario; gates: {names}")
            n = item.get("step")
            if isinstance(n, int) and n > n_steps:
                problems.append(f"{where_is([*parts, 'step'])}: step {n} does not exist; "
                                f"the scenario has {n_steps} step(s), counted from 1 (0: the gate's start)")

    if problems:
        raise ScenarioError(source, problems)
    return Scenario(
        name=doc.get("name", Path(source).stem),
        source=source,
        start=start,
        config=config,
        acl=acl,
        steps=steps,
        expect=list(doc.get("expect", [])),
        expect_lines=[where_is.line("expect", i) for i in range(len(doc.get("expect", [])))],
        clock_synced=doc.get("clock_synced", True),
        state=doc.get("state"),
        repeat_window_s=doc.get("repeat_window_s", REPEAT_WINDOW_S),
        gates=gates,
        link_delay_s=doc.get("link_delay_s", LINK_DELAY_S),
    )


class Simulator:
    """Runs a Scenario through the core; `run()` yields output lines (dicts). A scenario
    with [[gates]] makes an agent.simsite.SiteSimulator (the same interface)."""

    def __new__(cls, scenario: Scenario, **kwargs: Any) -> Self:
        if cls is Simulator and scenario.gates:
            from agent.simsite import SiteSimulator

            return super().__new__(SiteSimulator)
        return super().__new__(cls)

    def __init__(self, scenario: Scenario, *, fp=None, trace_io: bool = False, boot: str = "sim-boot"):
        self.sc = scenario
        self.fp = fp or fastpath
        self.trace_io = trace_io
        self.sink = SequenceSink("sim")
        self.boot = boot
        self.acl = scenario.acl
        self.start_epoch = scenario.start.timestamp()
        self.synced = scenario.clock_synced
        implementation = getattr(self.fp, "IMPLEMENTATION", None) or (
            "compiled" if self.fp.__name__.endswith("_compiled") else "pure"
        )
        table = build_table(self.acl, self.fp) if self.acl else None
        state = self.fp.GateState.from_dict(scenario.state) if scenario.state else self.fp.GateState()
        self.gate = Gate(
            scenario.config, self.fp, table, state, boot=boot,
            implementation=implementation, version=__version__,
        )
        if self.acl:
            self.gate.set_timezone(self.acl.timezone)
        self._streams: dict[tuple[str, str], Any] = {}
        self._filters: dict[str, RepeatFilter] = {}  # per serial reader, as each SerialReader has one
        self._fed: dict[tuple[str, str], float] = {}  # when each serial stream last got bytes
        self._queue: list[tuple[float, int, dict]] = []
        self._n = 0  # steps pushed (a remote open's or mode command's request id)
        self._order = itertools.count()  # the queue's order among steps of one time
        self.records: list[dict] = []
        # record_steps[i]: the number of the step that caused records[i] (0: the gate's start).
        # Beside the records, not in them: a record holds the contract's fields only.
        self.record_steps: list[int] = []
        self.record_gates: list[str] = []  # the gate that made each record (a site scenario's several)
        self._timer_step = 0  # the step that last set the gate's next timer: its ticks' records are its

    def now(self, t: float) -> ev.Now:
        return ev.Now(mono=MONO_START + t, wall=self.start_epoch + t, synced=self.synced)

    def _push(self, t: float, step: dict) -> None:
        self._n += 1
        heapq.heappush(self._queue, (t, next(self._order), step))

    def _serial_events(self, reader: str, results: list, t: float) -> list[Any]:
        """Decoded serial results as SerialReader._deliver hands them on: errors always, a
        card only when the repeat filter takes it as a new presentation."""
        filt = self._filters.setdefault(reader, RepeatFilter(self.sc.repeat_window_s))
        return [r.as_event(reader) for r in results
                if r.error is not None or r.key is None or filt.accept(r.key, MONO_START + t)]

    def _emit(self, step: ev.Step, t: float, n: int) -> Iterator[tuple[int, dict]]:
        for rec in self.sink.commit(step.records):
            self.records.append(rec)
            self.record_steps.append(n)
            self.record_gates.append(self.sc.config.gate)
            yield n, rec
        if self.trace_io:
            for cmd in step.commands:
                if isinstance(cmd, ev.SetOutput):
                    yield n, {"trace": "io", "ts": rfc3339_ms(self.start_epoch + t), "line": cmd.line,
                              "active": cmd.active}
                elif isinstance(cmd, ev.Feedback):
                    yield n, {"trace": "feedback", "ts": rfc3339_ms(self.start_epoch + t),
                              "reader": cmd.reader, "signal": cmd.signal}

    def _handle(self, event: Any, t: float, n: int) -> Iterator[tuple[int, dict]]:
        """One stimulus's event through the gate; a timer it sets is the step's."""
        before = self.gate.next_deadline()
        yield from self._emit(self.gate.handle(event, self.now(t)), t, n)
        if self.gate.next_deadline() != before:
            self._timer_step = n

    def _tick(self, t: float) -> Iterator[tuple[int, dict]]:
        """The gate's own timer ran out: its records belong to the step that set it."""
        yield from self._emit(self.gate.handle(ev.Tick(), self.now(t)), t, self._timer_step)

    def _events_for(self, step: dict, t: float) -> list[Any]:
        """Turn one stimulus into core events, through the real decoders."""
        reader = step.get("reader")
        key_width = self.acl.key_width if self.acl else 24
        if "card" in step:
            key = parse_card_string(step["card"], key_width)
            return [ev.CardRead(reader=reader, key=key, format="key", raw=step["card"])]
        if "wiegand" in step:
            res = decode_wiegand(step["wiegand"], key_width)
            return [res.as_event(reader)]
        if "serial" in step:
            proto = step["protocol"]
            stream = self._streams.get((reader, proto))
            if stream is None:
                cls = Rdm6300Stream if proto == "rdm6300" else EmLineStream
                stream = self._streams[(reader, proto)] = cls(key_width=key_width)
            data = bytes.fromhex(step["serial"].replace(" ", ""))
            if isinstance(stream, Rdm6300Stream):
                # SerialReader reports a torn frame once the line has been quiet for a read's timeout.
                self._fed[(reader, proto)] = t
                heapq.heappush(self._queue, (t + SERIAL_QUIET_S, next(self._order),
                                             {"_quiet": (reader, proto), "_fed": t, "_step": step.get("_step", 0),
                                              "gate": step.get("gate")}))
            return self._serial_events(reader, stream.feed(data), t)
        if "osdp" in step:
            # What agent/hw/osdp_reader.py makes of libosdp's card event (imported here only:
            # it is the OSDP adapter's module, loaded by a scenario that has OSDP steps).
            from agent.hw.osdp_reader import decode_osdp_card

            fmt, text = step.get("osdp_format", "wiegand"), step["osdp"]
            nbytes = -(-len(text) // 8)  # bits packed from the first byte's top bit, as libosdp gives them
            data = text.encode("ascii", "replace") if fmt == "ascii" else \
                int(text.ljust(nbytes * 8, "0"), 2).to_bytes(nbytes, "big")
            return [decode_osdp_card(fmt, data, None if fmt == "ascii" else len(text), key_width).as_event(reader)]
        if "pass" in step:
            return [ev.PassSensor(side=step["pass"])]
        if "button" in step:
            return [ev.Button(direction=step["button"])]
        if "remote_open" in step:
            return [ev.RemoteOpen(direction=step["remote_open"], request_id=f"sim-{self._n}")]
        if "fire" in step:
            return [ev.FireLoop(open=step["fire"] == "open")]
        if "fire_reset" in step:
            return [ev.FireReset(by="input")]
        if "ready" in step:
            return [ev.ReadyLine(ok=step["ready"])]
        if "lockdown_switch" in step:
            return [ev.LockdownSwitch(on=step["lockdown_switch"])]
        if "tamper" in step:
            return [ev.Tamper(active=step["tamper"])]
        if "mode" in step:
            return [ev.SetMode(mode=step["mode"], by="command", request_id=f"sim-{self._n}")]
        return []

    def _apply_acl(self, step: dict) -> list[Any]:
        """An access-list change, as the downlink makes it: build the new table,
        then swap it in; a refused list is reported and the old one kept."""
        kind = "delta" if "acl_delta" in step else "snapshot"
        doc = step.get("acl_delta") or step.get("acl_snapshot")
        try:
            new = self.acl.apply_delta(doc) if kind == "delta" and self.acl else AccessList.from_snapshot(doc)
        except AclRejected as exc:
            out = [ev.Report("acl.rejected", exc.record_fields(doc.get("version")))]
            if exc.code == "base_mismatch":
                out.append(ev.Report("acl.requested", {"reason": "base_mismatch",
                                                       "have": self.acl.version if self.acl else None}))
            return out
        self.acl = new
        return [ev.SwapTable(table=build_table(new, self.fp), kind=kind, base=doc.get("base"),
                             timezone=new.timezone)]

    def run(self) -> Iterator[dict]:
        """The output lines: event records (and, with trace_io, io and feedback lines)."""
        return (item for _n, _g, item in self.run_gates())

    def run_steps(self) -> Iterator[tuple[int, dict]]:
        """(step, line) pairs: each output line with the number of the step that caused it
        (counted from 1 as the scenario's [[steps]]; 0 for the gate's start). A record the
        gate's own timer writes (a pulse end, a passage timeout) is the step's that set it."""
        return ((n, item) for n, _g, item in self.run_gates())

    def run_gates(self) -> Iterator[tuple[int, str, dict]]:
        """(step, gate, line): run_steps() with the gate that made each line (this one's)."""
        gate = self.sc.config.gate
        for n, item in self._run():
            yield n, gate, item

    def _run(self) -> Iterator[tuple[int, dict]]:
        yield from self._emit(self.gate.start(self.now(0.0)), 0.0, 0)
        for step in self.sc.steps:
            self._push(step["t"], step)
        while self._queue:
            t_next = self._queue[0][0]
            deadline = self.gate.next_deadline()
            if deadline is not None and deadline - MONO_START <= t_next:
                yield from self._tick(max(deadline - MONO_START, 0.0))
                continue
            t, _, step = heapq.heappop(self._queue)
            yield from self._dispatch(t, step)
        # Let pending deadlines (pulse ends, passage timeouts) run out.
        while (deadline := self.gate.next_deadline()) is not None:
            yield from self._tick(deadline - MONO_START)

    def _dispatch(self, t: float, step: dict) -> Iterator[tuple[int, dict]]:
        """One queued step (a scenario's, a walk's passage, a serial line's quiet) at `t`."""
        n = step.get("_step", 0)
        if "_quiet" in step:
            if self._fed.get(step["_quiet"]) == step["_fed"]:  # no bytes since: the line was quiet
                events = self._serial_events(step["_quiet"][0], self._streams[step["_quiet"]].flush(), t)
                for event in events:
                    yield from self._handle(event, t, n)
            return
        if "clock_synced" in step:
            self.synced = step["clock_synced"]
        if "acl_delta" in step or "acl_snapshot" in step:
            for event in self._apply_acl(step):
                yield from self._handle(event, t, n)
            return
        # A step with no stimulus of its own (a clock change, a repeat the filter took)
        # still shows the core the time.
        for event in self._events_for(step, t) or [ev.Tick()]:
            before = len(self.records)
            yield from self._handle(event, t, n)
            if step.get("walk") is not None:
                granted = [r for r in self.records[before:] if r["type"] == "access.granted"]
                if granted and not granted[0].get("check"):
                    side = "A" if granted[0]["direction"] == "in" else "B"
                    self._push(t + step["walk"], {"pass": side, "t": t + step["walk"], "_step": n,
                                                  "gate": step.get("gate")})


# Keys of an expectation that are not the record's own field: the step that caused it and
# the gate that made it (beside the record); "alarm_gate" is a rollcall's own "gate" field.
_BESIDE = {"step": 0, "gate": 1}


def _matches(rec: dict, beside: tuple, want: dict) -> bool:
    """A record, with (the number of the step that caused it, the gate that made it)
    beside it, has every wanted field; "step" and "gate" are those, not fields of the
    record, and "alarm_gate" is the record's own "gate" (a rollcall's: whose alarm)."""
    return all((beside[_BESIDE[k]] if k in _BESIDE else rec.get("gate" if k == "alarm_gate" else k)) == v
               for k, v in want.items())


def _want(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in EXPECT_KEYS}


def _out_of_order(records: list[dict], steps: list[tuple],
                  items: list[dict]) -> tuple[int, dict, int, list[int]] | None:
    """None when the items match records in their order; else (k, want, at, earlier): item
    k (from 1) with its fields found no record after index `at` (item k - 1's record, -1
    for the first item), and `earlier` are the records up to `at` it matches. Each item
    takes the first record after the previous item's that it matches (the earliest choice
    leaves the most for the items after it, so no other choice could succeed)."""
    at = -1
    for k, item in enumerate(items, 1):
        want = _want(item)
        hit = next((i for i in range(at + 1, len(records)) if _matches(records[i], steps[i], want)), None)
        if hit is None:
            return k, want, at, [i for i in range(at + 1) if _matches(records[i], steps[i], want)]
        at = hit
    return None


def check_expectations(records: list[dict], expect: list[dict],
                       lines: list[int | None] | None = None, steps: list[int] | None = None,
                       gates: list[str] | None = None) -> list[str]:
    """Unmet `expect` entries of a scenario, as messages ("expect 2 (line 40): ...", counted
    from 1; lines: Scenario.expect_lines). steps: the number of the step that caused each
    record (Simulator.record_steps), for entries that name a step; without it they match none.
    gates: the gate that made each record (Simulator.record_gates), for entries naming a gate."""
    failures = []
    by_step: list[int | None] = list(steps) if steps is not None else [None] * len(records)
    beside = list(zip(by_step, gates if gates is not None else [None] * len(records), strict=True))
    for i, exp in enumerate(expect):
        line = lines[i] if lines and i < len(lines) else None
        where = f"expect {i + 1}" + (f" (line {line})" if line else "")
        if "sequence" in exp:
            unmet = _out_of_order(records, beside, exp["sequence"])
            k, want, at, earlier = unmet or (0, {}, -1, [])
            if unmet and not earlier:
                failures.append(f"{where}: sequence item {k} {want} matched no record")
            elif unmet:
                prev, prev_step = records[at], by_step[at]
                where_steps = ", ".join(str(by_step[j]) for j in earlier)
                failures.append(f"{where}: sequence out of order: item {k} {want} matched no record after item "
                                f"{k - 1}'s, record #{prev.get('seq')} ({prev.get('type')}) of step {prev_step}; "
                                f"it matched only records of step(s) {where_steps}")
            continue
        want = _want(exp)
        n = sum(1 for r, b in zip(records, beside, strict=True) if _matches(r, b, want))
        if "count" in exp and n != exp["count"]:
            failures.append(f"{where}: {want} matched {n} record(s), expected exactly {exp['count']}")
        elif "count" not in exp and n < exp.get("min", 1):
            failures.append(f"{where}: {want} matched {n} record(s), expected at least {exp.get('min', 1)}")
    return failures


def format_pretty(item: dict, tz=None, words: Mapping[str, str] | None = None, step: int | None = None,
                  gate: str | None = None) -> str:
    """One human line for `make run`: local time, [the step that caused it], the gate (a site
    scenario's), record number, type, fields; cards shown as facility,card. words: the io trace
    lines' words ("ON", "off", "feedback" and the feedback signals) in the user's language, as
    agent.tools.words.pretty_words() gives them; none: English. step, gate: from run_gates()."""
    from agent.core.cards import format_key

    def say(word: str) -> str:
        return words.get(word, word) if words else word

    ts = item.get("ts", "")
    if ts and tz is not None:
        ts = datetime.fromisoformat(ts).astimezone(tz).isoformat(timespec="milliseconds")
    ts = ts[11:23]
    if step is not None:
        ts += f" {f'[{step}]':<5}"  # a column of its own, the same width on every line
    if gate is not None:
        ts += f" {gate:<8}"
    if "trace" in item:
        if item["trace"] == "io":
            return f"{ts}       io {item['line']:<12} {say('ON') if item['active'] else say('off')}"
        return f"{ts}       io {item['reader']} {say('feedback')} {say(item['signal'])}"
    skip = {"v", "id", "seq", "ts", "clock_synced", "boot", "mono", "type"}
    parts = []
    for k, v in item.items():
        if k in skip or v is None:
            continue
        if k == "card" and isinstance(v, int):
            v = format_key(v)["facility_card"]
        parts.append(f"{k}={v}")
    return f"{ts} #{item['seq']:<4} {item['type']:<18} {' '.join(parts)}"
