"""The fastpath's interface, typed: what both twins (``_compiled`` and ``_pure``)
provide and every caller may use. tests/test_fastpath_api.py checks that each
twin has exactly these public names with these parameters, so the twins
cannot drift apart nor grow a method the other lacks.

These are Protocols for type checkers and readers; at run time the callers
get ``fastpath.Table``, ``fastpath.GateState`` and ``fastpath.decide`` from
the selector (fastpath/__init__.py), whichever twin it picked.
"""
from __future__ import annotations

from typing import Protocol

from .columns import TableChange, TableColumns

__all__ = ["Decide", "GateStateAPI", "TableAPI"]


class TableAPI(Protocol):
    """The immutable card table built from one list's columns."""

    version: str
    key_width: int

    # With base and change: the base table's cards patched (a delta), not all built again.
    def __init__(self, columns: TableColumns, base: TableAPI | None = None,
                 change: TableChange | None = None) -> None: ...
    def __len__(self) -> int: ...  # card entries
    def lookup(self, key: int) -> int: ...  # the card's person index; -1: unknown or blocked-only
    def is_blocked(self, key: int) -> bool: ...
    def person_id(self, index: int) -> str: ...
    def person_index(self, person_id: str) -> int: ...  # -1 when the table has no such person
    def is_guest(self, index: int) -> bool: ...
    @property
    def persons(self) -> int: ...  # how many persons (people and guests)
    def nbytes(self) -> int: ...  # an estimate of the memory held


class GateStateAPI(Protocol):
    """Anti-passback positions and guest uses, by person id (they outlive a table swap)."""

    def record_passage(self, person_id: str, direction: int, epoch_s: int, day: int, guest: bool) -> None: ...
    def position(self, person_id: str, day: int) -> int: ...  # codes.POS_*; unknown when set on another day
    def last_entry(self, person_id: str) -> int: ...
    def uses(self, person_id: str) -> int: ...
    def forget_movements(self) -> None: ...  # positions and last entries, after a fire
    def to_dict(self) -> dict: ...
    @classmethod
    def from_dict(cls, d: dict) -> GateStateAPI: ...


class Decide(Protocol):
    """One card read: (result, person_index, warning), the integer codes of fastpath.codes."""

    def __call__(self, table: TableAPI, state: GateStateAPI, key: int, direction: int, mode: int,
                 epoch_s: int, minute_of_week: int, day: int, busy: bool, apb_mode: int,
                 apb_window_s: int) -> tuple[int, int, int]: ...
