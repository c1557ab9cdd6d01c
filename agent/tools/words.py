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
