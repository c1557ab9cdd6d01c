"""The ``fp`` fixture for modules whose tests do not differ between the fastpath twins.

``from tests.twins import one_twin  # noqa: F401`` in such a module replaces the
conftest's ``fp`` (each twin in turn) with the twin a board runs: the core's and the
fastpath's tests hold the twins together, these run once.
"""
from __future__ import annotations

import pytest

from tests.conftest import board_twin


@pytest.fixture(name="fp")
def one_twin():
    """One twin: the compiled one, or the pure one where only it exists."""
    return board_twin()
