"""One exception type for every user-facing failure.

Commands raise FlashflexError(problem, fix); the CLI prints it as ONE line
("error: <problem> — <fix>") and exits non-zero. Tracebacks only appear with FLASHFLEX_DEBUG=1.
"""

from __future__ import annotations


class FlashflexError(Exception):
    """A problem the user can act on: what went wrong and how to fix it."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem
