"""One exception type for every user-facing failure.

Commands raise FlashflexError(problem, fix); the CLI prints it as ONE line
("error: <problem> — <fix>") and exits non-zero. Tracebacks only appear with FLASHFLEX_DEBUG=1.
"""

from __future__ import annotations

import re

MAX_LINE = 2000  # characters of an error's problem, and of its fix, kept: a message quoting a file can be huge
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = MAX_LINE) -> str:
    """`text` safe to print on a terminal: control characters (escape sequences from a file's bytes, say) shown as
    \\xNN, newlines and tabs as spaces, and at most `limit` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text).replace("\n", " ").replace("\t", " "))
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit} more characters)"


class FlashflexError(Exception):
    """A problem the user can act on: what went wrong and how to fix it. Both parts are made printable (no control
    characters, a bounded length) since they may quote a file, a request or a setting."""

    exit_code = 1

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = printable(problem)
        self.fix = printable(fix) if fix is not None else None
        super().__init__(self.one_line())

    def one_line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem


class BudgetBelowMinimum(FlashflexError):
    """The budget cannot hold the smallest plan (the planner names each part): a caller that may ask for less (fewer
    server slots) tries again."""
