"""TableColumns: the compiled access list as plain columns.

agent.core.acl turns a validated access-list document into one TableColumns;
each fastpath twin builds its own immutable Table from it. Columns are
`array.array`s or C-contiguous memoryviews of the same format (compact; the
compiled twin copies them into C memory without the GIL, so a mapped list file
is read in place).

Two forms for two fields (give one of each pair, the other left empty):

- person ids: ``person_ids`` (a list of str), or ``person_id_blob`` (the
  UTF-8 ids back to back) with ``person_id_off`` (n_persons + 1 offsets);
- cards: sorted by key (``card_keys``, ``card_person``, ``card_flags``), or
  by person (``person_card_off``: n_persons + 1 offsets into
  ``person_card_keys``; ``blocked_keys``: sorted, a blocked key nobody holds
  is an entry of its own). The access list (agent.core.acl) gives the second
  forms: no sort and no Python object per card or person.

A Table bisects ids for ``person_index`` over the leading persons that are in
ascending id order (the list keeps its people sorted by id, guests after).
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class TableColumns:
    version: str
    key_width: int = 24
    # Cards, sorted ascending by key, unique (or empty: the by-person form).
    card_keys: array = field(default_factory=lambda: array("Q"))
    card_person: array = field(default_factory=lambda: array("i"))  # person index; -1: blocked card of nobody
    card_flags: array = field(default_factory=lambda: array("B"))  # codes.CARD_BLOCKED
    # Persons (people and guests), by index.
    person_ids: list[str] = field(default_factory=list)  # pseudonymous ids (or the blob form)
    person_from: array = field(default_factory=lambda: array("q"))  # UTC epoch s, inclusive; codes.NO_START
    person_until: array = field(default_factory=lambda: array("q"))  # UTC epoch s, exclusive; codes.NO_END
    person_groupset: array = field(default_factory=lambda: array("i"))  # index into gs_* lists
    person_flags: array = field(default_factory=lambda: array("B"))  # codes.PERSON_GUEST
    person_max_uses: array = field(default_factory=lambda: array("i"))  # guests: entries allowed; 0: unlimited
    # Group sets: each the OR of its groups' weekly schedules, codes.BITMAP_BYTES each.
    gs_entry: list[bytes] = field(default_factory=list)  # entry allowed, ordinary day
    gs_entry_holiday: list[bytes] = field(default_factory=list)  # entry allowed on a holiday
    gs_exit: list[bytes] = field(default_factory=list)  # exit allowed (any day)
    holidays: array = field(default_factory=lambda: array("i"))  # sorted local date ordinals
    # The compact forms (see above).
    person_id_blob: bytes = b""
    person_id_off: array = field(default_factory=lambda: array("Q"))
    person_card_off: array = field(default_factory=lambda: array("Q"))
    person_card_keys: array = field(default_factory=lambda: array("Q"))
    blocked_keys: array = field(default_factory=lambda: array("Q"))

    def sorted_form(self) -> TableColumns:
        """The same table with ids as a list of str and cards sorted by key (the first
        forms): for reading a table's contents in tests and tools, not for speed."""
        if not len(self.person_id_off) and not len(self.person_card_off):
            return self
        ids = list(self.person_ids)
        if len(self.person_id_off):
            blob, off = bytes(self.person_id_blob), self.person_id_off
            ids = [blob[off[i]:off[i + 1]].decode("utf-8") for i in range(len(off) - 1)]
        keys, person, flags = self.card_keys, self.card_person, self.card_flags
        if len(self.person_card_off):
            off, pkeys = self.person_card_off, self.person_card_keys
            owner = {pkeys[j]: p for p in range(len(off) - 1) for j in range(off[p], off[p + 1])}
            blocked = set(self.blocked_keys)
            for k in blocked:
                owner.setdefault(k, -1)
            order = sorted(owner)
            keys = array("Q", order)
            person = array("i", [owner[k] for k in order])
            flags = array("B", [1 if k in blocked else 0 for k in order])  # codes.CARD_BLOCKED
        return replace(
            self, card_keys=keys, card_person=person, card_flags=flags, person_ids=ids,
            person_id_blob=b"", person_id_off=array("Q"), person_card_off=array("Q"),
            person_card_keys=array("Q"), blocked_keys=array("Q"),
        )


@dataclass(frozen=True)
class TableChange:
    """How the columns of a new table differ from those of a base table, for
    ``Table(columns, base=old, change=...)`` to patch the old table's cards
    instead of building them all (a delta changes a few persons of a million).

    - ``drop``: base person indices that are gone (removed, replaced, every
      guest), ascending;
    - ``add``: new person indices that are new (added, replaced, every guest),
      ascending; every other person is kept, in order, with the same cards,
      validity and groupset index;
    - ``gone_keys``: the card keys of the dropped persons;
    - ``old_blocked``: the base's blocked keys (the new ones are the columns').
    """

    drop: array = field(default_factory=lambda: array("q"))
    add: array = field(default_factory=lambda: array("q"))
    gone_keys: array = field(default_factory=lambda: array("Q"))
    old_blocked: array = field(default_factory=lambda: array("Q"))
