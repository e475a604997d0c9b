"""Errors that help: each problem names the received value, the likely cause and the fix.

Validation collects every problem it finds and raises them together, so a user fixes a
config in one round instead of one error at a time.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Problem:
    what: str  # the received value, named: "targets=['q_prj']"
    cause: str  # why it cannot work
    fix: str  # what to do instead

    def __str__(self) -> str:
        return f"{self.what}: {self.cause}. Fix: {self.fix}"


class SlimtuneError(ValueError):
    """A user-facing error carrying one or more problems."""

    def __init__(self, problems: Problem | Iterable[Problem], context: str = ""):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        head = f"{context}: " if context else ""
        if len(self.problems) == 1:
            msg = head + str(self.problems[0])
        else:
            lines = [f"  {i}. {p}" for i, p in enumerate(self.problems, 1)]
            msg = f"{head}{len(self.problems)} problems\n" + "\n".join(lines)
        super().__init__(msg)


class Problems:
    """Collects problems; `raise_if_any` raises them all at once."""

    def __init__(self, context: str = ""):
        self.context = context
        self.items: list[Problem] = []

    def add(self, what: str, cause: str, fix: str) -> None:
        self.items.append(Problem(what, cause, fix))

    def raise_if_any(self) -> None:
        if self.items:
            raise SlimtuneError(self.items, self.context)


def did_you_mean(name: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
