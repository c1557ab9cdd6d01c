"""Telemetry: the health figures published every N seconds.

``build_telemetry`` gathers them from the journal (backlog, oldest pending
age), the uplink (drain rate) and the runtime (reader errors, decision
latencies, the gate-stall probe, clock, access list), into the message of
``agent/schemas/telemetry.schema.json``. ``Uplink.publish_telemetry`` sends
it (QoS 0, not retained: a lost sample is not resent). ``gate_figures``
gathers the running gate's part (gate thread, downlink, access list), and
``ReaderErrorTally`` counts the readers' errors between two messages.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

from agent import CONTRACT_VERSION
from agent.core.records import rfc3339_ms

log = logging.getLogger("agent.uplink.telemetry")

CPU_TEMP_PATH = Path("/sys/class/thermal/thermal_zone0/temp")
_NO_DECISIONS = {"p50": None, "p99": None, "p999": None}  # decision_ms before any decision


class JournalForTelemetry(Protocol):
    def backlog(self) -> int: ...
    def oldest_pending_age_s(self, now_wall: float) -> float | None: ...


def read_cpu_temp_c(path: Path = CPU_TEMP_PATH) -> float | None:
    """SoC temperature in Celsius from the thermal zone (millidegrees), or None."""
    try:
        return round(int(path.read_text().strip()) / 1000.0, 1)
    except (OSError, ValueError):
        return None


def build_telemetry(
    journal: JournalForTelemetry,
    runtime_stats: dict[str, Any],
    now_wall: float,
    *,
    uplink_stats: dict[str, Any] | None = None,
    cpu_temp_path: Path = CPU_TEMP_PATH,
) -> dict:
    """One telemetry message.

    runtime_stats (from the runtime; missing keys give empty/neutral values):
      ``boot`` (str), ``uptime_s`` (float), ``clock_synced`` (bool),
      ``acl_version`` (str or None), ``acl_age_s`` (float or None),
      ``reader_errors`` ({reader: {kind: count}}),
      ``decision_ms`` ({p50, p99, p999} in ms, from GateRuntime.latency_percentiles();
      nulls when missing),
      ``drain_per_s`` (used when no uplink_stats are given),
      ``queues`` ({depth: {lane: n}, dropped: {lane: n}}, GateRuntime.queue_stats()),
      ``downlink`` (Downlink.stats(): the flood guard's counters and the time floor),
      ``gate_stall`` (GateRuntime.gate_stall(): {interval_ms, max_ms}, the longest the
      gate thread could not run since the previous message and since start).
    uplink_stats: ``Uplink.stats()``, for ``drain_per_s``.
    """
    oldest = journal.oldest_pending_age_s(now_wall)
    decision = dict(runtime_stats.get("decision_ms") or _NO_DECISIONS)
    drain = (uplink_stats or runtime_stats).get("drain_per_s", 0.0) or 0.0
    return {
        "v": CONTRACT_VERSION,
        "ts": rfc3339_ms(now_wall),
        "boot": runtime_stats.get("boot", "unknown"),
        "backlog": int(journal.backlog()),
        "oldest_pending_s": None if oldest is None else round(max(0.0, float(oldest)), 3),
        "drain_per_s": round(float(drain), 3),
        "reader_errors": {
            reader: {kind: int(n) for kind, n in kinds.items()}
            for reader, kinds in (runtime_stats.get("reader_errors") or {}).items()
        },
        "decision_ms": decision,
        "clock_synced": bool(runtime_stats.get("clock_synced", False)),
        "cpu_temp_c": read_cpu_temp_c(cpu_temp_path),
        "uptime_s": round(max(0.0, float(runtime_stats.get("uptime_s", 0.0))), 3),
        "acl_version": runtime_stats.get("acl_version"),
        "acl_age_s": runtime_stats.get("acl_age_s"),
        "acl_stale": bool(runtime_stats.get("acl_stale", False)),
        **{k: runtime_stats[k] for k in ("queues", "downlink", "site") if runtime_stats.get(k)},
        **_stall_fields(runtime_stats.get("gate_stall")),
    }


def _stall_fields(stall: dict[str, Any] | None) -> dict[str, float]:
    """``gate_stall_max_ms`` (since the previous message) and ``gate_stall_since_start_ms``,
    when the runtime gave them (agent.runtime.StallProbe says what they measure)."""
    if not stall:
        return {}
    return {"gate_stall_max_ms": round(max(0.0, float(stall.get("interval_ms", 0.0))), 3),
            "gate_stall_since_start_ms": round(max(0.0, float(stall.get("max_ms", 0.0))), 3)}


class ReaderErrorTally:
    """``reader.error`` records counted per reader and kind between two telemetry messages:
    ``count`` on the gate thread (its ``on_record``), ``take`` on the housekeeping thread."""

    def __init__(self) -> None:
        self._counts: dict[str, dict[str, int]] = {}

    def count(self, record: dict) -> None:
        kinds = self._counts.setdefault(str(record.get("reader")), {})
        kind = str(record.get("kind"))
        kinds[kind] = kinds.get(kind, 0) + 1

    def take(self) -> dict[str, dict[str, int]]:
        """The counts since the last take (a new tally starts)."""
        counts, self._counts = self._counts, {}
        return {reader: dict(kinds) for reader, kinds in counts.items()}


def gate_figures(runtime: Any, downlink: Any, *, boot: str, uptime_s: float, clock_synced: bool,
                 table_version: str | None, reader_errors: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The ``runtime_stats`` of ``build_telemetry`` from the running gate: ``runtime``
    (``GateRuntime``: decision latencies, queues, the stall probe) and ``downlink``
    (``Downlink`` or None: the list's version, age and staleness, its counters).
    A downlink whose status fails leaves the list's fields to the table in use."""
    lat = runtime.latency_percentiles()
    acl_status: dict[str, Any] = {}
    if downlink is not None:
        try:
            acl_status = downlink.status()
        except Exception:
            log.exception("downlink status failed")
    stats: dict[str, Any] = {
        "boot": boot,
        "uptime_s": uptime_s,
        "clock_synced": clock_synced,
        "acl_version": acl_status.get("acl_version", table_version),
        "acl_age_s": acl_status.get("acl_age_s"),
        "acl_stale": bool(acl_status.get("acl_stale", False)),
        "reader_errors": reader_errors,
        "decision_ms": {"p50": lat.get("p50_ms"), "p99": lat.get("p99_ms"), "p999": lat.get("p999_ms")},
        "queues": runtime.queue_stats(),
        "gate_stall": runtime.gate_stall(),
    }
    if downlink is not None:
        stats["downlink"] = downlink.stats()
    # The site's other gates' events (docs/site.md): as received, then as the core took them.
    core = getattr(getattr(runtime, "gate", None), "site", None)
    site = dict(core.counts) if core is not None else {}
    for key, n in getattr(downlink, "site_counts", {}).items():
        site[key] = site.get(key, 0) + n  # "malformed" is counted on both sides
    if any(site.values()):
        stats["site"] = {k: int(v) for k, v in site.items()}
    return stats
