"""The console's words: the page texts, looked up in the tools' catalogue per session.

The pages are in Russian or English from the same catalogue as the tools
(agent/i18n.py, agent/locale/ru/LC_MESSAGES/gate-agent.po), but the language
is the browser session's, not the process's: ``translator(lang)`` gives the
lookup a page renders with. Every text a template or the app passes to ``t()``
is listed in PAGE_WORDS below, as a literal ``_()`` call, so the catalogue's
check (``python -m agent.i18n check``, tests/test_i18n.py) sees it;
tests/test_console_web.py fails when a template uses a text missing here.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from agent import i18n
from agent.i18n import catalog

__all__ = ["ACTION_REASONS", "PAGE_WORDS", "speaking", "term", "translator"]


def _(text: str) -> str:
    """A marker for the catalogue's check; the lookup is translator()'s."""
    return text


PAGE_WORDS = (
    _('Gate console'),
    _('Status'),
    _('Live passages'),
    _('Today'),
    _('Presence and roll-call'),
    _('Journal'),
    _('Technician'),
    _('Log out'),
    _('active'),
    _('inactive'),
    _('asserted'),
    _('at rest'),
    _('Not allowed'),
    _("This page is for a technician's account."),
    _('from'),
    _('to'),
    _('card'),
    _('person'),
    _('type'),
    _('Search'),
    _('Dates: YYYY-MM-DD, today, yesterday or a date and time; a card in any form: 100,60179, 0006613779 or hex:UID.'),
    _('found'),
    _('only the first'),
    _('Export CSV'),
    _('time'),
    _('reader'),
    _('direction'),
    _('details'),
    _('connected to the gate'),
    _('The agent is not reachable: waiting for it...'),
    _('records skipped (the page was too slow)'),
    _('connecting...'),
    _('all'),
    _('in'),
    _('out'),
    _('person or card'),
    _('Log in'),
    _('No account yet: add one on the gate with gate-agent console user add NAME --role technician'),
    _('Account'),
    _('Password'),
    _('Print'),
    _('day'),
    _('saved'),
    _('The nightly reset passed since this was saved: nobody counts as inside until the next passage.'),
    _('Roll-call: fire alarm at'),
    _('still open: exits are being recorded'),
    _('ended at'),
    _('Not yet seen leaving'),
    _('Inside at the alarm'),
    _('Left since'),
    _('Inside now'),
    _('name'),
    _('since'),
    _('gate'),
    _('The agent is not reachable: the gate may still work, but this page cannot show its state. Check the service: systemctl status gate-agent'),
    _('Mode'),
    _('commanded'),
    _('fire alarm'),
    _('fire loop open'),
    _('Alarms'),
    _('none'),
    _('not yet confirmed by the server'),
    _('last record'),
    _('Access list'),
    _('version'),
    _('cards'),
    _('age'),
    _('out of date'),
    _('Clock'),
    _('synchronised'),
    _('not synchronised'),
    _('Uplink'),
    _('off (no broker configured)'),
    _('connected'),
    _('not connected'),
    _('Readers'),
    _('state'),
    _('errors'),
    _('last read'),
    _('online'),
    _('offline'),
    _('unknown'),
    _('Outputs'),
    _('Inputs'),
    _('up for'),
    _('Every action is journalled with your account.'),
    _('Manual open'),
    _('Open for entry'),
    _('Open for exit'),
    _('I/O test'),
    _('Pulse 1 s'),
    _('use Manual open'),
    _('safety line: test it with gate-agent io-test, service stopped'),
    _('Enroll a card'),
    _('Press the button, then present the card to any reader: its forms appear here.'),
    _('Read the next card'),
    _('waiting for a card...'),
    _('facility,card'),
    _('printed number'),
    _('key'),
    _('format'),
    _('passages'),
    _('people who came in'),
    _('Passages per 10 minutes'),
    _('Denials by reason'),
    _('Late arrivals'),
    _('first entry after'),
    _('The login form expired; try again.'),
    _('Too many failed logins: wait {n} s and try again.'),
    _('Wrong account or password.'),
    _('entries'),
    _('exits'),
    _('the card {card!r} cannot be read: {error}'),
    _('The agent does not answer: nothing was done. Is the gate-agent service running?'),
    _('Refused by the agent: {message}'),
    _('Refused: {reason}'),
    _('Done.'),
    _('Unknown mode.'),
    _('Unknown direction.'),
    _('guard'),
    _('technician'),
)


# The agent's reasons for refusing a console action (agent/consolesock.py), said for a person.
ACTION_REASONS = {
    "use_open": _("the turnstile's unlock lines are opened with Manual open, which is journalled as an open"),
    "safety_line": _("a safety line (stop, fire release): test it with gate-agent io-test, service stopped"),
    "unknown_line": _("this board has no such line"),
    "fire": _("refused during a fire alarm: the mode returns after the fire release is reset"),
}


def translator(lang: str) -> Callable[[str], str]:
    """The lookup for one page: English as written, Russian from the compiled catalogue."""
    if lang != "ru":
        return lambda text: text
    table = catalog("ru")
    return lambda text: table.get(text, text)


def term(kind: str, value: object, lang: str) -> str:
    """A contract identifier (a mode, a denial reason, an alarm) as the tools show it:
    Russian: «пожарная тревога (fire)»; English: the identifier itself."""
    from agent.tools.words import ALARM_TERMS, MODE_TERMS, REASON_TERMS

    ident = str(value)
    table = {"mode": MODE_TERMS, "reason": REASON_TERMS, "alarm": ALARM_TERMS}.get(kind, {})
    if lang != "ru" or ident not in table:
        return ident
    word = catalog("ru").get(table[ident], table[ident])
    return ident if word == table[ident] else f"{word} ({ident})"


_SPEAKING = threading.Lock()


@contextmanager
def speaking(lang: str) -> Iterator[None]:
    """The tools' own messages raised inside (journaltool's, presence's: what is wrong with the
    journal or presence.json, a date or a card that cannot be read) in the page's language.
    agent/i18n.py has one language per process, so it is set for the call, under a lock; keep
    what runs inside short (opening a file, parsing a field)."""
    with _SPEAKING:
        before = i18n.language()
        i18n.set_language(lang if lang in i18n.LANGUAGES else "en")
        try:
            yield
        finally:
            i18n.set_language(before)
