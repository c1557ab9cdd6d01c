"""A scenario with several gates of one site, and the link between them (docs/scenarios.md).

A scenario's ``[[gates]]`` declare the turnstiles of one school; each is its
own core ``Gate`` with its own ``GateState``, journal (named after the gate:
record ids ``north:3``), serial readers and timers, run by a plain
``Simulator`` of its own. This module runs them together in one virtual time
and carries what the service's MQTT path carries (docs/site.md): every record
a gate journals reaches each other gate of the site as a
``SiblingRecord(gate, record)`` event, ``link_delay_s`` later (what
agent/downlink ``_on_sibling`` hands the gate).

A gate's link can drop (``link = "down"``) and come back (``link = "up"``).
While it is down, the gate decides alone: its own records wait for the link
(the service's journal keeps them), and its siblings' records for it wait at
the broker (its persistent session); when the link is back both are delivered,
each in its order, ``link_delay_s`` later. A record still held when the
scenario ends is never delivered.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Iterator
from typing import Any

from agent.core import events as ev
from agent.core.gateconfig import GateConfig, GateConfigError
from agent.core.records import SequenceSink
from agent.simulator import MONO_START, Scenario, Simulator

__all__ = ["SiteGate", "SiteSimulator", "site_gates"]


@dataclasses.dataclass(frozen=True)
class SiteGate:
    """One gate of a site scenario: its name (the config's ``gate``) and config."""

    name: str
    config: GateConfig


def site_gates(entries: list[dict], base: dict, where_is: Any, problems: list[str],
               skip: set[int] = frozenset()) -> list[SiteGate]:
    """The scenario's ``[[gates]]``: each entry's settings over the scenario's ``[gate]``
    ones (``base``), with ``gate`` = its ``name``; problems are added with where they are.
    skip: entries the schema has faulted already (by index)."""
    known = {f.name for f in dataclasses.fields(GateConfig)}
    allowed = ", ".join(["name", *sorted(known - {"gate"})])
    out: list[SiteGate] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if i in skip:
            continue

        def at(*key: str, i: int = i) -> str:
            return where_is(["gates", i, *key])

        name = entry.get("name")
        if name in seen:
            problems.append(f"{at('name')}: {name!r} is declared twice; each gate once")
            continue
        seen.add(name)
        settings = {k: v for k, v in entry.items() if k != "name"}
        for k in sorted(set(settings) - known):
            problems.append(f"{at(k)}: unknown setting; allowed: {allowed}")
            settings.pop(k)
        if "gate" in settings:
            problems.append(f"{at('gate')}: a gate of [[gates]] is named by `name`")
            settings.pop("gate")
        try:
            out.append(SiteGate(name, GateConfig(**{**base, **settings, "gate": name})))
        except (GateConfigError, TypeError, ValueError) as exc:
            problems.append(f"{at()}: {exc}")
    return out


class SiteSimulator(Simulator):
    """Runs a site scenario: every gate in one virtual time, records passed between them
    as the site's events are. ``Simulator(scenario)`` makes one for a scenario with gates."""

    def __init__(self, scenario: Scenario, *, fp=None, trace_io: bool = False, boot: str = "sim-boot"):
        self.sc = scenario
        self.trace_io = trace_io
        self.start_epoch = scenario.start.timestamp()
        self._queue: list[tuple[float, int, dict]] = []
        self._order = itertools.count()
        self.gates: dict[str, Simulator] = {}
        for g in scenario.gates:
            one = Simulator(dataclasses.replace(scenario, config=g.config, gates=[]), fp=fp,
                            trace_io=trace_io, boot=f"{boot}-{g.name}"[:64])  # each board its own
            one.sink = SequenceSink(g.name)  # ids "north:3": unique across the site, as the service's
            one._queue, one._order = self._queue, self._order  # one queue, one virtual time
            self.gates[g.name] = one
        self.fp = next(iter(self.gates.values())).fp
        self.records: list[dict] = []
        self.record_steps: list[int] = []
        self.record_gates: list[str] = []
        self.link_up = {name: True for name in self.gates}
        self._outbox: dict[str, list[tuple[dict, int]]] = {name: [] for name in self.gates}  # the journal's
        self._session: dict[str, list[tuple[str, dict, int]]] = {name: [] for name in self.gates}  # the broker's

    @property
    def gate(self) -> Any:
        """The first gate's core, for callers of a one-gate Simulator."""
        return next(iter(self.gates.values())).gate

    def _push(self, t: float, step: dict) -> None:
        heapq.heappush(self._queue, (t, next(self._order), step))

    def run_gates(self) -> Iterator[tuple[int, str, dict]]:
        for name, one in self.gates.items():
            yield from self._own(name, one._emit(one.gate.start(one.now(0.0)), 0.0, 0), 0.0)
        for step in self.sc.steps:
            self._push(step["t"], step)
            self.gates[step["gate"]]._n += 1  # its steps, as a one-gate run counts (a command's request id)
        while True:
            due = [(d - MONO_START, name) for name, one in self.gates.items()
                   if (d := one.gate.next_deadline()) is not None]
            deadline = min(due) if due else None
            if not self._queue and deadline is None:
                break
            if deadline is not None and (not self._queue or deadline[0] <= self._queue[0][0]):
                t, name = max(deadline[0], 0.0), deadline[1]
                yield from self._own(name, self.gates[name]._tick(t), t)
                continue
            t, _, step = heapq.heappop(self._queue)
            if "_deliver" in step:
                yield from self._deliver(t, step)
            elif "link" in step:
                self._link(t, step["gate"], step["link"] == "up")
            else:
                yield from self._own(step["gate"], self.gates[step["gate"]]._dispatch(t, step), t)

    def _own(self, name: str, lines: Iterator[tuple[int, dict]], t: float) -> Iterator[tuple[int, str, dict]]:
        """A gate's output lines: its records kept (with step and gate) and sent to the site."""
        for n, item in lines:
            if "trace" not in item:
                self.records.append(item)
                self.record_steps.append(n)
                self.record_gates.append(name)
                if self.link_up[name]:
                    self._publish(name, item, n, t)
                else:
                    self._outbox[name].append((item, n))
            yield n, name, item

    def _publish(self, sender: str, record: dict, n: int, t: float) -> None:
        for to in self.gates:
            if to != sender:
                self._push(t + self.sc.link_delay_s,
                           {"_deliver": sender, "to": to, "record": record, "_step": n})

    def _deliver(self, t: float, item: dict) -> Iterator[tuple[int, str, dict]]:
        to, sender, n = item["to"], item["_deliver"], item["_step"]
        if not self.link_up[to]:
            self._session[to].append((sender, item["record"], n))  # kept for it by the broker
            return
        # What the gate journals on a sibling's record (its roll-call opening) is the
        # sibling record's step's: the same cause.
        one = self.gates[to]
        yield from self._own(to, one._handle(ev.SiblingRecord(sender, item["record"]), t, n), t)

    def _link(self, t: float, name: str, up: bool) -> None:
        was, self.link_up[name] = self.link_up[name], up
        if not up or was:
            return
        held, self._outbox[name] = self._outbox[name], []
        for record, n in held:
            self._publish(name, record, n, t)
        waiting, self._session[name] = self._session[name], []
        for sender, record, n in waiting:
            self._push(t + self.sc.link_delay_s, {"_deliver": sender, "to": name, "record": record, "_step": n})
