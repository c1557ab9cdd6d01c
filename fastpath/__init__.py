"""The hot path: card table and access decision, compiled (Cython) or pure.

Selection (like msgpack): the compiled twin when it imports, else the pure
one. ``GATE_PUREPYTHON=1`` forces the pure twin; ``GATE_REQUIRE_COMPILED=1``
makes a missing compiled twin an ImportError instead of a silent fallback.

Both twins export the same names (typed in fastpath/api.py, which a test
holds both twins to):

- ``Table(columns: TableColumns)``: immutable card table. ``len(table)`` is
  the number of card entries; ``table.version``; ``table.key_width``;
  ``table.lookup(key)`` gives the card's person index, -1 for no person
  (unknown or blocked-only); ``table.is_blocked(key)``;
  ``table.person_id(index)``; ``table.is_guest(index)``; ``table.persons``;
  ``table.nbytes()`` an estimate of the memory it holds.
- ``GateState()``: anti-passback positions and guest uses, keyed by person id
  so they outlive a table swap. ``record_passage(person_id, direction,
  epoch_s, day, guest)``; ``position(person_id, day)`` (POS_UNKNOWN when the
  position was set on another local day); ``last_entry(person_id)``;
  ``uses(person_id)``; ``to_dict()`` / ``GateState.from_dict(d)`` for
  persistence.
- ``sort_keys(keys)``: array("Q") of the card keys sorted (the compiled twin
  without the interpreter lock, for the checks of a big received list).
- ``decide(table, state, key, direction, mode, epoch_s, minute_of_week, day,
  busy, apb_mode, apb_window_s) -> (result, person_index, warning)`` with the
  integer codes of ``fastpath.codes``.
"""
from __future__ import annotations

import os

from . import codes
from .columns import TableColumns

_force_pure = os.environ.get("GATE_PUREPYTHON", "") in ("1", "true", "yes")
_require_compiled = os.environ.get("GATE_REQUIRE_COMPILED", "") in ("1", "true", "yes")

if _force_pure and _require_compiled:
    raise ImportError("GATE_PUREPYTHON=1 and GATE_REQUIRE_COMPILED=1 contradict each other; unset one")

if _force_pure:
    from ._pure import GateState, Table, decide, sort_keys

    IMPLEMENTATION = "pure"
else:
    try:
        from ._compiled import GateState, Table, decide, sort_keys

        IMPLEMENTATION = "compiled"
    except ImportError as exc:
        if _require_compiled:
            raise ImportError(
                "GATE_REQUIRE_COMPILED=1 but the compiled fastpath is missing "
                f"({exc}); build it with `make build` (needs gcc and python3-dev)"
            ) from exc
        from ._pure import GateState, Table, decide, sort_keys

        IMPLEMENTATION = "pure"

__all__ = ["IMPLEMENTATION", "GateState", "Table", "TableColumns", "codes", "decide", "sort_keys"]
