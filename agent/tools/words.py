"""Small pieces of text the technician's tools share, translated."""
from __future__ import annotations

from agent.i18n import _


def age_text(seconds: float | None) -> str:
    """An age in the unit a person reads at a glance: 45 s, 12 min, 3.5 h, 2.1 days."""
    if seconds is None:
        return _("none")
    if seconds < 120:
        return _("{n} s").format(n=round(seconds))
    if seconds < 7200:
        return _("{n} min").format(n=round(seconds / 60))
    if seconds < 172800:
        return _("{n} h").format(n=round(seconds / 3600, 1))
    return _("{n} days").format(n=round(seconds / 86400, 1))


# The contract's identifiers (docs/contract.md) as a Russian technician reads
# them, in the terms of access-control manuals (docs/glossary.md). In Russian
# the identifier is kept beside the term, «обычный (normal)», so what the
# screen says can be found in the journal, the contract and a bug report; in
# English the identifier is the word itself and is shown alone.
MODE_TERMS = {
    "normal": "normal mode",
    "entry_only": "entry only",
    "free": "free passage",
    "lockdown": "lockdown",
    "fire": "fire alarm",
}
REASON_TERMS = {
    "lockdown": "gate locked down",
    "wrong_direction": "wrong direction",
    "blocked": "blocked card",
    "unknown_card": "unknown card",
    "not_yet_valid": "card not yet valid",
    "expired": "card expired",
    "holiday": "holiday",
    "outside_schedule": "outside the schedule",
    "exit_restricted": "exit restricted",
    "antipassback": "anti-passback",
    "gate_busy": "turnstile busy",
}
ALARM_TERMS = {
    "fire": "fire alarm",
    "tamper": "tamper",
    "journal_capacity": "journal nearly full",
    "journal_readonly": "SD card read-only",
    "publish_refused": "broker refuses events",
    "clock_unsynced": "clock not synchronised",
    "clock_behind_floor": "clock behind the time floor",
    "expiry_unchecked": "expiry dates not checked",
    "acl_missing": "no access list",
    "acl_stale": "access list out of date",
    "acl_corrupt": "access list damaged",
    "acl_store_failed": "access list not saved",
    "downlink_flood": "command flood",
    "ack_ahead": "server confirmation ahead",
    "broker_dropped": "broker dropped the connection",
    "tls_rejected": "TLS rejected",
    "ready_lost": "turnstile not ready",
    "counters_reset": "counters reset",
    "uplink_config": "uplink settings",
}
READER_ERROR_TERMS = {
    "parity": "parity error",
    "length": "wrong frame length",
    "checksum": "checksum error",
    "glitch": "line noise",
    "garbage": "unreadable data",
    "disconnected": "reader disconnected",
}


def _term(table: dict[str, str], value: object) -> str:
    """The Russian term with the identifier beside it; English: the identifier."""
    ident = str(value)
    if ident not in table:
        return ident
    word = _(table[ident])
    return ident if word == table[ident] else f"{word} ({ident})"


def mode_text(mode: object) -> str:
    """A gate mode as the screen shows it: «обычный (normal)» / "normal"."""
    return _term(MODE_TERMS, mode)


def reason_text(reason: object) -> str:
    """A denial reason: «заблокированная карта (blocked)» / "blocked"."""
    return _term(REASON_TERMS, reason)


def alarm_text(kind: object) -> str:
    """An alarm kind: «нет списка доступа (acl_missing)» / "acl_missing"; unknown kinds as they are."""
    return _term(ALARM_TERMS, kind)


def reader_error_text(kind: object) -> str:
    """A reader error kind: «ошибка чётности (parity)» / "parity"."""
    return _term(READER_ERROR_TERMS, kind)
