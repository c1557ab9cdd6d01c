"""What one gate learns from the other gates of its site (docs/site.md).

Pure, like the rest of the core: the Gate hands each sibling record here with
the time, and asks what follows. A sibling is another gate of the same site;
its records come from its ``events`` topic, unchanged (the contract's event
records), and the topic names the gate.

Three things are taken from them:

- ``passage`` (source ``card``, a person named): the person moved. The gate
  applies it to its own anti-passback state as if the passage were its own
  (position and day, last entry for timed anti-passback, a guest's use).
- ``access.granted`` (a card, a person, not fire mode's unchecked record): the
  person holds a grant at that gate until it ends. While it lasts, the same
  person is refused here under hard and timed anti-passback, and granted with
  the ``antipassback`` warning under soft: one card presented at turnstile A
  and, before passing, at B and C opens one turnstile, not three.
- ``passage`` or ``passage.timeout`` for that person from that gate ends the
  grant; so does its own wait (this gate's ``wait_s`` plus a second of slack,
  from when the grant arrived here), if neither ever arrives.

The order rule for passages that cross (a pupil enters at A and leaves at B
within a second, and B's record reaches A before A's own was applied...):
each person's last movement wins by its ``ts``, the board clocks' wall time.
A sibling passage older than the last movement this gate knows of for that
person (its own or another sibling's) is not applied; a tie goes to the
record applied first (the same record again, once its id was forgotten, is
never applied twice). One stamped more than ``FUTURE_S`` ahead of this
gate's clock is not applied either (a wrong clock would otherwise win over
every real passage after it). Records are taken once, by ``id`` (the broker may
deliver one twice): the last ``SEEN_MAX`` ids are remembered.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

from .presence import record_wall

__all__ = ["GRANT_SLACK_S", "SEEN_MAX", "Movement", "SiteView"]

SEEN_MAX = 4096  # record ids remembered for de-duplication
# A sibling passage stamped further ahead of this gate's clock than this is not applied: one of
# the two clocks is wrong, and a passage "from the future" would win over every real one after it.
FUTURE_S = 120.0
GRANT_SLACK_S = 1.0  # a sibling's grant is held this much past this gate's own wait
_MOVED_MAX = 200_000  # people whose last movement time is kept (a school has a few thousand)
_MOVED_KEEP_S = 2 * 86400  # ... pruned to the last two days past that


class Movement(NamedTuple):
    """A sibling passage to apply: person, direction ("in"/"out"), epoch seconds."""

    person: str
    direction: str
    epoch: float


class SiteView:
    """The sibling grants in force and the order of movements, for one gate."""

    def __init__(self, wait_s: float) -> None:
        self._hold_s = float(wait_s) + GRANT_SLACK_S
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._grants: dict[str, tuple[str, float]] = {}  # person -> (gate, until, monotonic s)
        self._moved: dict[str, float] = {}  # person -> epoch s of the last movement applied
        # Since start (telemetry's "site"): what was made of the sibling records.
        self.counts = {"passages": 0, "grants": 0, "duplicate": 0, "stale": 0, "future": 0,
                       "ignored": 0, "malformed": 0}

    # --- this gate's own passages ---------------------------------------------

    def moved(self, person: str, epoch: float) -> None:
        """This gate's own passage of `person` at `epoch` (its wall clock)."""
        if epoch >= self._moved.get(person, float("-inf")):
            self._moved[person] = epoch
        self._prune(epoch)

    # --- sibling records ------------------------------------------------------

    def admit(self, record: Any) -> bool:
        """True the first time a record (by its ``id``) comes; a repeat or a record with no
        id is counted and refused. Call it before anything else is done with the record
        (presence, the roll-call, ``take``)."""
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            self.counts["malformed"] += 1
            return False
        rid = record["id"]
        if rid in self._seen:
            self.counts["duplicate"] += 1
            return False
        self._seen[rid] = None
        if len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
        return True

    def take(self, gate: str, record: dict, mono: float, wall: float | None = None) -> Movement | None:
        """A record of sibling `gate` that ``admit`` let in, arrived at monotonic `mono`
        (this gate's wall clock then: `wall`, None when that clock is not synchronised):
        the movement to apply, or None (a grant noted or ended, an older passage, a grant
        or passage stamped too far from `wall`, a type of no interest)."""
        rtype = record.get("type")
        person = record.get("person")
        if not isinstance(person, str) or not person or rtype not in (
                "access.granted", "passage", "passage.timeout"):
            self.counts["ignored"] += 1
            return None
        if rtype == "access.granted":
            stamped = record_wall(record)
            if "check" in record or "source" in record:
                self.counts["ignored"] += 1  # fire mode's unchecked record, a manual open
            elif wall is not None and (stamped is None or stamped < wall - self._hold_s):
                self.counts["stale"] += 1  # a grant from a backlog: over long ago
            else:
                self._grants[person] = (gate, mono + self._hold_s)
                self.counts["grants"] += 1
            return None
        held = self._grants.get(person)
        if held is not None and held[0] == gate:
            del self._grants[person]  # that gate's grant ended, one way or the other
        if rtype == "passage.timeout" or record.get("source") != "card":
            return None
        direction = record.get("direction")
        epoch = record_wall(record)
        if direction not in ("in", "out") or epoch is None:
            self.counts["malformed"] += 1
            return None
        if wall is not None and epoch > wall + FUTURE_S:
            self.counts["future"] += 1  # the sibling's clock (or this one) is wrong
            return None
        if epoch <= self._moved.get(person, float("-inf")):
            self.counts["stale"] += 1  # this gate knows of a later movement (or this one)
            return None
        self._moved[person] = epoch
        self._prune(epoch)
        self.counts["passages"] += 1
        return Movement(person, direction, epoch)

    def granted_elsewhere(self, person: str | None, mono: float) -> str | None:
        """The sibling gate where `person` holds a grant now, or None."""
        if person is None:
            return None
        held = self._grants.get(person)
        if held is None:
            return None
        if mono >= held[1]:
            del self._grants[person]
            return None
        return held[0]

    @property
    def grants(self) -> dict[str, str]:
        """person -> sibling gate, for the grants noted (some may have run out)."""
        return {p: g for p, (g, _) in self._grants.items()}

    def _prune(self, epoch: float) -> None:
        if len(self._moved) > _MOVED_MAX:
            cut = epoch - _MOVED_KEEP_S
            self._moved = {p: t for p, t in self._moved.items() if t >= cut}
        if len(self._grants) > SEEN_MAX:
            # Grants the broker delivered and no end followed (a sibling died mid-wait).
            self._grants = dict(list(self._grants.items())[-SEEN_MAX // 2:])
