"""Everything between the gate thread and the regional server: the local
journal (SQLite) and, later, the MQTT uplink that drains it."""

from .journal import LOW_VALUE_TYPES, Journal, JournalError

__all__ = ["LOW_VALUE_TYPES", "Journal", "JournalError"]
