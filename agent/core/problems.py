"""ProblemsError: the one form of "this input cannot be used" in the project.

A config, the gate settings, a hardware profile, a scenario: each is checked
whole, and every problem found is reported at once, one per line with where
it is, under a heading that says what was read and what to do. The tools
print the message as it is (or translate it line by line at their boundary,
agent/tools/words.py); a caller that wants the problems one by one reads
``problems``.
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ProblemsError"]


class ProblemsError(ValueError):
    """Every problem of one input. ``heading`` ends in a colon; ``problems`` one line each."""

    def __init__(self, heading: str, problems: Sequence[str]) -> None:
        self.heading = heading
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{heading}\n{lines}")
