"""The regional side: what runs at the region, not on a gate.

- ``ingest``: the reference ingest (`gate-agent ingest`): every gate's
  events stored once by id and acknowledged to the gate (docs/ingest.md);
- ``store``: where it keeps them, SQLite or PostgreSQL (the ``postgres``
  extra; a board installs neither);
- ``tools``: the regional tools, `gate-agent acl push`, `cmd`,
  `fleet status`, `keygen`.

A gate imports nothing from here: the board's service, tools and tests of the
core run without it (tests/test_core_purity.py checks the direction).
"""
