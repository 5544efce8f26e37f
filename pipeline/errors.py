"""Errors that map to the contract's exit codes.

0 success; 2 bad usage or config; 3 invalid input data; 1 any other failure.
"""

from __future__ import annotations


class VaepipeError(Exception):
    exit_code = 1


class UsageError(VaepipeError):
    """Bad command line, config file or feature spec (exit code 2)."""

    exit_code = 2


class InputDataError(VaepipeError):
    """The input data cannot be used: names the file and column (exit code 3)."""

    exit_code = 3

    def __init__(self, message: str, *, file: str | None = None, column: str | None = None):
        parts = [message]
        if column is not None:
            parts.append(f"column {column!r}")
        if file is not None:
            parts.append(f"file {file}")
        super().__init__(": ".join(parts[:1]) + ("" if len(parts) == 1 else " (" + ", ".join(parts[1:]) + ")"))
        self.file = file
        self.column = column


def causes(e: BaseException | None, follow_context: bool = False):
    """The exception and what caused it, outermost first. Ray task errors carry the task's own
    exception in ``.cause``; ``follow_context`` also walks ``__context__`` (raised while handling)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or (e.__context__ if follow_context else None)


def first_line(e: BaseException, limit: int = 500) -> str:
    """The first non-blank line of an exception's message, capped at `limit` characters."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0][:limit] if lines else ""
